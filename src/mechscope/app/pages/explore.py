"""Explore: pick a model and a prompt, trace it or run one analysis as a background job (with
progress), and see the saved run appear. The job (:mod:`mechscope.app.jobs`) runs in a Dash
background-callback process and is the only thing in the app that writes to the store."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from mechscope.app import ui
from mechscope.app.data import AppContext, results_of
from mechscope.app.jobs import ANALYSES, TAKES_PROMPT, run_job
from mechscope.figures import layer_head_heatmap

PATH = "/explore"
NAME = "Explore"

SPEC = "explore-spec"
PROMPT = "explore-prompt"
ANALYSIS = "explore-analysis"
RUN_BUTTON = "explore-run"
PROGRESS = "explore-progress"
STATUS = "explore-status"
RESULT = "explore-result"  # dcc.Store: {"run_id": ...} or {"error": ...}
OUTPUT = "explore-output"


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Explore"),
        html.Div(["model ", dcc.Input(id=SPEC, type="text", value="zoo:induction", debounce=False,
                                      placeholder="zoo:induction, smollm2, a path",
                                      style={"width": "260px"})]),
        html.Div(["prompt (token ids separated by spaces for a zoo model)",
                  dcc.Textarea(id=PROMPT, value="1 2 3 4 5 1 2 3 4",
                               style={"width": "100%", "height": "60px"})]),
        dcc.RadioItems(id=ANALYSIS, value="trace", inline=True,
                       options=[{"label": a, "value": a} for a in ANALYSES]),
        html.Div(f"{', '.join(TAKES_PROMPT)} use the prompt; the others run on the model's "
                 "built-in inputs.", style={"fontSize": "12px", "color": "#555"}),
        html.Button("Run", id=RUN_BUTTON, n_clicks=0),
        html.Progress(id=PROGRESS, value="0", max="4", style={"marginLeft": "12px"}),
        html.Span(id=STATUS, style={"marginLeft": "8px"}),
        dcc.Store(id=RESULT),
        html.Div(id=OUTPUT),
    ])  # fmt: skip


def disabled_layout(**_: Any) -> html.Div:
    return html.Div([html.H2("Explore"),
                     ui.message("this dashboard was started with --no-explore: it only reads the "
                                "store")])  # fmt: skip


def job_view(ctx: AppContext, result: dict[str, Any] | None) -> Any:
    """What a finished job shows: its error, or the new run's figures and where to look next."""
    if not result:
        return None
    if "error" in result:
        return ui.message(result["error"], kind="error")
    store = ctx.store()
    run_id = result["run_id"]
    rec = store.get_run(run_id)
    out: list[Any] = [html.Div([f"saved run {rec.id} ({rec.kind}, {rec.model_spec}) · ",
                                dcc.Link("see its heads", href="/heads")],
                               className="ms-new-run")]  # fmt: skip
    if rec.kind == "trace":
        out.append(ui.table(store.table(rec.id, "predictions")))
        norms = store.tensors(rec.id, "head_norms")["last_token_mean"]
        out.append(ui.graph(layer_head_heatmap(norms, title="head output norm, last token"),
                            height=360))  # fmt: skip
    for _, r in results_of(store, rec.id):
        out.append(ui.graph(r.figure(), height=400))
    return html.Div(out)


def register(app: dash.Dash, ctx: AppContext) -> None:
    if not ctx.explore:
        return
    root = str(ctx.root)

    @app.callback(
        Output(RESULT, "data"), Input(RUN_BUTTON, "n_clicks"),
        State(SPEC, "value"), State(PROMPT, "value"), State(ANALYSIS, "value"),
        background=True, prevent_initial_call=True,
        running=[(Output(RUN_BUTTON, "disabled"), True, False)],
        progress=[Output(PROGRESS, "value"), Output(PROGRESS, "max"), Output(STATUS, "children")],
    )  # fmt: skip
    def job(set_progress: Any, _: int, spec: str, prompt: str, analysis: str) -> dict[str, Any]:
        return run_job(root, spec, prompt, analysis,
                       lambda i, n, text: set_progress((str(i), str(n), text)))  # fmt: skip

    @app.callback(Output(ui.SELECTED_RUN, "data", allow_duplicate=True), Input(RESULT, "data"),
                  prevent_initial_call=True)  # fmt: skip
    def select(result: dict[str, Any] | None) -> str:
        if not result or "run_id" not in result:
            raise dash.exceptions.PreventUpdate
        return str(result["run_id"])  # the other pages open the new run

    @app.callback(Output(OUTPUT, "children"), Input(RESULT, "data"))
    def show(result: dict[str, Any] | None) -> Any:
        try:
            return job_view(ctx, result)
        except Exception as exc:
            return ui.error_message(exc)
