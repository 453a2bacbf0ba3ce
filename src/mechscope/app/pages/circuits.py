"""Circuits: a run's circuit graph (SAE circuit / Circuit results) and the cross-method agreement
view: the same heads as ranked by the SAE circuit, patching, retrieval and divergence."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from mechscope.app import ui
from mechscope.app.data import AppContext, head_grids, results_of, run_choice

PATH = "/circuits"
NAME = "Circuits"

RUN = "circuits-run"
GRAPH = "circuits-graph"
AGREEMENT = "circuits-agreement"

#: Grids that are not a ranking of heads by importance (left out of the agreement view).
NOT_RANKINGS = ("head norm",)


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Circuits"),
        dcc.Dropdown(id=RUN, placeholder="a run"),
        html.H3("Circuit graph"),
        html.Div(id=GRAPH),
        html.H3("Agreement between methods"),
        html.Div(id=AGREEMENT),
    ])  # fmt: skip


def circuit_figures(ctx: AppContext, run_id: str) -> list[Any]:
    """The run's circuit graphs and method evaluations."""
    out: list[Any] = []
    for name, r in results_of(ctx.store(), run_id,
                              kinds=("sae_circuit", "circuit", "circuit_evaluation")):  # fmt: skip
        fig = r.figure("graph") if r.kind == "sae_circuit" else r.figure()  # type: ignore[call-arg]
        out += [html.Div(f"{name or r.kind}", style={"fontStyle": "italic"}),
                ui.graph(fig, height=420)]  # fmt: skip
    return out or [ui.message("this run holds no circuit; run `mechscope demo` or "
                              "`mechscope circuits sae --store DIR`")]  # fmt: skip


def agreement(ctx: AppContext, run_id: str, k: int = 10) -> Any:
    """:func:`mechscope.figures.head_rank_comparison` of the run's head rankings."""
    from mechscope.figures import head_rank_comparison

    grids = {n: g for n, g in head_grids(ctx.store(), run_id).items() if n not in NOT_RANKINGS}
    if len(grids) < 2:
        return ui.message(f"this run ranks heads by {len(grids)} method(s); the agreement view "
                          "needs two or more")  # fmt: skip
    return ui.graph(head_rank_comparison(grids, k=k), height=420)


def register(app: dash.Dash, ctx: AppContext) -> None:
    @app.callback(Output(RUN, "options"), Output(RUN, "value"), Input(RUN, "id"),
                  State(ui.SELECTED_RUN, "data"))  # fmt: skip
    def fill(_: str, selected: str | None) -> tuple[Any, Any]:
        return run_choice(ctx.store(), selected)

    @app.callback(Output(GRAPH, "children"), Output(AGREEMENT, "children"), Input(RUN, "value"))
    def show(run_id: str | None) -> tuple[Any, Any]:
        if not run_id:
            return ui.message("no complete run in this store"), None
        try:
            return circuit_figures(ctx, run_id), agreement(ctx, run_id)
        except Exception as exc:
            return ui.error_message(exc), None
