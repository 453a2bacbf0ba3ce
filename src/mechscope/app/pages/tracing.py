"""Causal tracing: a run's traces (tokens x layers: hidden / MLP / attention, whichever it holds)
and the view averaged over facts (stored aggregates, and the store's traces averaged by kind)."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from mechscope.app import ui
from mechscope.app.data import (
    AppContext,
    aggregate_groups,
    all_traces,
    default_value,
    results_of,
    trace_label,
    trace_runs,
)

PATH = "/tracing"
NAME = "Causal tracing"

RUN = "tracing-run"
FIGURES = "tracing-figures"
AVERAGE = "tracing-average"


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Causal tracing"),
        html.P("p(answer) with the clean state restored at each (layer, token) of a corrupted run; "
               "subject tokens are marked *."),
        dcc.Dropdown(id=RUN, placeholder="a run holding a causal trace"),
        html.Div(id=FIGURES),
        html.H3("Averaged over facts"),
        html.Div(id=AVERAGE),
    ])  # fmt: skip


def trace_figures(ctx: AppContext, run_id: str | None) -> list[Any]:
    """One figure per causal trace (and stored aggregate) of a run."""
    if not run_id:
        return [ui.message("no run in this store holds a causal trace; run `mechscope demo` or "
                           "`mechscope causal-trace --store DIR`")]  # fmt: skip
    found = results_of(ctx.store(), run_id, kinds=("causal_trace", "causal_trace_aggregate"))
    return [html.Div([html.Div(trace_label(run_id, n, r), style={"fontStyle": "italic"}),
                      ui.graph(r.figure(), height=420)]) for n, r in found]  # fmt: skip


def averaged(ctx: AppContext) -> list[Any]:
    """The averaged-over-facts view: every stored aggregate, then the store's traces averaged
    by kind (:func:`mechscope.attribution.causal_trace_result.aggregate_traces`)."""
    from mechscope.attribution.causal_trace_result import aggregate_traces

    store = ctx.store()
    out: list[Any] = []
    for opt in trace_runs(store):
        for name, r in results_of(store, opt["value"], kinds=("causal_trace_aggregate",)):
            out += [html.Div(f"stored: {trace_label(opt['value'], name, r)}"),
                    ui.graph(r.figure(), height=380)]  # fmt: skip
    for key, group in aggregate_groups(all_traces(store)).items():
        out += [html.Div(f"{len(group)} trace(s) in this store, {key}"),
                ui.graph(aggregate_traces(group).figure(), height=380)]  # fmt: skip
    return out or [ui.message("no causal traces to average")]


def register(app: dash.Dash, ctx: AppContext) -> None:
    @app.callback(Output(RUN, "options"), Output(RUN, "value"), Output(AVERAGE, "children"),
                  Input(RUN, "id"), State(ui.SELECTED_RUN, "data"))  # fmt: skip
    def fill(_: str, selected: str | None) -> tuple[Any, Any, Any]:
        options = trace_runs(ctx.store())
        return options, default_value(options, selected), averaged(ctx)

    @app.callback(Output(FIGURES, "children"), Input(RUN, "value"))
    def show(run_id: str | None) -> list[Any]:
        return trace_figures(ctx, run_id)
