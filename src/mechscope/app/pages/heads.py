"""Heads: a run's layer x head grids (retrieval, divergence, sinks, head norms, ...); click a
head to see its attention pattern on a prompt, with token labels (the run's stored patterns)."""

from __future__ import annotations

from typing import Any

import dash
from dash import ALL, Input, Output, State, dcc, html

from mechscope.app import ui
from mechscope.app.data import (
    AppContext,
    clicked_head,
    head_grids,
    head_pattern,
    pattern_prompts,
    run_choice,
)
from mechscope.figures import attention_pattern, layer_head_heatmap

PATH = "/heads"
NAME = "Heads"

RUN = "heads-run"
GRIDS = "heads-grids"
GRID = "heads-grid"  # pattern-matching id type: {"type": GRID, "name": method}
PROMPT = "heads-prompt"
SELECTED = "heads-selected"  # dcc.Store: [layer, head]
PATTERN = "heads-pattern"


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Heads"),
        dcc.Dropdown(id=RUN, placeholder="a run"),
        html.Div(id=GRIDS, style={"display": "flex", "flexWrap": "wrap"}),
        html.H3("Attention pattern"),
        html.Div(["prompt ", dcc.Dropdown(id=PROMPT, clearable=False, style={"width": "200px"})],
                 style={"display": "flex", "alignItems": "center", "gap": "8px"}),
        dcc.Store(id=SELECTED),
        html.Div(id=PATTERN),
    ])  # fmt: skip


def grid_graphs(ctx: AppContext, run_id: str | None) -> list[Any]:
    """One clickable heatmap per ``[layer, head]`` grid of the run."""
    if not run_id:
        return [ui.message("no complete run in this store")]
    grids = head_grids(ctx.store(), run_id)
    if not grids:
        return [ui.message("this run holds no per-head scores")]
    return [html.Div(ui.graph(layer_head_heatmap(g, title=name), id={"type": GRID, "name": name},
                              height=340), style={"width": "420px"})
            for name, g in grids.items()]  # fmt: skip


def pattern_view(ctx: AppContext, run_id: str | None, prompt: int | None,
                 head: list[int] | None) -> Any:  # fmt: skip
    """The clicked head's pattern, or a message saying what is missing."""
    if not run_id:
        return ui.message("no run selected")
    if prompt is None:
        return ui.message("this run stores no attention patterns; trace the model on the "
                          "Explore page to get a run that does", kind="warn")  # fmt: skip
    if not head:
        return ui.message("click a head in a grid above to see its attention pattern")
    layer, h = head
    z, tokens = head_pattern(ctx.store(), run_id, prompt, layer, h)
    fig = attention_pattern(z, tokens, title=f"L{layer}H{h} on prompt {prompt}")
    return ui.graph(fig, height=520)


def register(app: dash.Dash, ctx: AppContext) -> None:
    @app.callback(Output(RUN, "options"), Output(RUN, "value"), Input(RUN, "id"),
                  State(ui.SELECTED_RUN, "data"))  # fmt: skip
    def fill(_: str, selected: str | None) -> tuple[Any, Any]:
        return run_choice(ctx.store(), selected)

    @app.callback(Output(GRIDS, "children"), Output(PROMPT, "options"), Output(PROMPT, "value"),
                  Output(SELECTED, "data"), Input(RUN, "value"))  # fmt: skip
    def show(run_id: str | None) -> tuple[Any, Any, Any, Any]:
        prompts = pattern_prompts(ctx.store(), run_id) if run_id else []
        options = [{"label": f"prompt {i}", "value": i} for i in prompts]
        return grid_graphs(ctx, run_id), options, prompts[0] if prompts else None, None

    @app.callback(Output(SELECTED, "data", allow_duplicate=True),
                  Input({"type": GRID, "name": ALL}, "clickData"), prevent_initial_call=True)  # fmt: skip
    def click(_: list[Any]) -> list[int]:
        head = clicked_head(dash.ctx.triggered[0]["value"] if dash.ctx.triggered else None)
        if head is None:
            raise dash.exceptions.PreventUpdate
        return list(head)

    @app.callback(Output(PATTERN, "children"), Input(RUN, "value"), Input(PROMPT, "value"),
                  Input(SELECTED, "data"))  # fmt: skip
    def pattern(run_id: str | None, prompt: int | None, head: list[int] | None) -> Any:
        try:
            return pattern_view(ctx, run_id, prompt, head)
        except Exception as exc:
            return ui.error_message(exc)
