"""Runs: the store's runs in a filterable table; open one (its sections); compare two."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from mechscope.app import ui
from mechscope.app.data import AppContext, default_value, run_options, run_rows
from mechscope.app.ui import DataTable

PATH = "/"
NAME = "Runs"

TABLE = "runs-table"
DETAIL = "runs-detail"
COMPARE_A = "runs-compare-a"
COMPARE_B = "runs-compare-b"
COMPARE_OUT = "runs-compare"

COLUMNS = ("id", "kind", "status", "model", "created", "results", "error")


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Runs"),
        html.P("Filter by typing in the boxes under the column names (e.g. kind = demo); "
               "select a run to open it."),
        DataTable(
            id=TABLE, columns=[{"name": c, "id": c} for c in COLUMNS], data=[],
            filter_action="native", sort_action="native", row_selectable="single",
            page_size=15, style_cell={"fontFamily": "monospace", "fontSize": "12px",
                                      "textAlign": "left"},
        ),
        html.Div(id=DETAIL),
        html.H3("Compare two runs"),
        html.Div([dcc.Dropdown(id=COMPARE_A, style={"flex": 1}),
                  dcc.Dropdown(id=COMPARE_B, style={"flex": 1})],
                 style={"display": "flex", "gap": "12px"}),
        html.Div(id=COMPARE_OUT),
    ])  # fmt: skip


def run_view(ctx: AppContext, run_id: str | None, *, height: int = 380) -> Any:
    """A run's header and its sections (:func:`mechscope.views.sections`), or a message."""
    if not run_id:
        return ui.message("no run selected")
    from mechscope import views

    try:
        store = ctx.store()
        rec = store.get_run(run_id)
        secs = views.sections(store, rec.id)
    except Exception as exc:  # shown in the page; the log keeps nothing secret
        return ui.error_message(exc)
    head = html.Div([html.H3(f"run {rec.id}"),
                     html.Div(f"kind {rec.kind} · model {rec.model_spec} · seed {rec.seed} · "
                              f"fingerprint {rec.model_fingerprint}")])  # fmt: skip
    if not secs:
        return html.Div([head, ui.message("this run holds no analysis to show")])
    return html.Div([head, *[ui.section(s, height=height) for s in secs]])


def register(app: dash.Dash, ctx: AppContext) -> None:
    @app.callback(Output(TABLE, "data"), Output(COMPARE_A, "options"), Output(COMPARE_B, "options"),
                  Input(TABLE, "id"))  # fmt: skip
    def fill(_: str) -> tuple[list[dict[str, Any]], Any, Any]:
        store = ctx.store()
        options = run_options(store)
        return run_rows(store), options, options

    @app.callback(Output(ui.SELECTED_RUN, "data"), Input(TABLE, "selected_row_ids"),
                  prevent_initial_call=True)  # fmt: skip
    def select(ids: list[str] | None) -> str:
        if not ids:
            raise dash.exceptions.PreventUpdate
        return ids[0]

    @app.callback(Output(DETAIL, "children"), Input(ui.SELECTED_RUN, "data"))
    def open_run(run_id: str | None) -> Any:
        return run_view(ctx, run_id) if run_id else ui.message("select a run to open it")

    @app.callback(Output(COMPARE_A, "value"), Output(COMPARE_B, "value"),
                  Input(COMPARE_A, "options"), State(ui.SELECTED_RUN, "data"))  # fmt: skip
    def defaults(options: list[dict[str, str]], selected: str | None) -> tuple[Any, Any]:
        first = default_value(options, selected)
        second = next((o["value"] for o in options if o["value"] != first), first)
        return first, second

    @app.callback(Output(COMPARE_OUT, "children"), Input(COMPARE_A, "value"),
                  Input(COMPARE_B, "value"))  # fmt: skip
    def compare(a: str | None, b: str | None) -> html.Div:
        cols = [html.Div(run_view(ctx, r, height=320), style={"flex": 1, "minWidth": 0})
                for r in (a, b)]  # fmt: skip
        return html.Div(cols, style={"display": "flex", "gap": "12px"})
