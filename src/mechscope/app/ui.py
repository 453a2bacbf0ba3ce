"""Small building blocks shared by the pages: a graph, a message, a table, a run's sections.

Plain functions from data to Dash components; nothing here reads the store.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from dash import dcc, html
from dash.dash_table.DataTable import DataTable

from mechscope.errors import MechscopeError

#: The id of the shell's ``dcc.Store`` holding the run chosen last (a run id; nothing else).
SELECTED_RUN = "selected-run"

_BOX = {"border": "1px solid #ddd", "borderRadius": "4px", "padding": "8px", "margin": "8px 0"}


def graph(fig: go.Figure, *, id: Any = None, height: int | None = None) -> dcc.Graph:
    """A ``dcc.Graph`` of ``fig`` (``id`` when callbacks need it)."""
    if height is not None:
        fig.update_layout(height=height)
    kwargs: dict[str, Any] = {"figure": fig, "config": {"displaylogo": False}}
    if id is not None:
        kwargs["id"] = id
    return dcc.Graph(**kwargs)


def message(text: str, *, kind: str = "info") -> html.Div:
    """A one-line notice; ``kind`` ``"error"`` shows it in red (class ``ms-error``)."""
    color = {"error": "#b2182b", "warn": "#8a6d3b"}.get(kind, "#555")
    return html.Div(text, className=f"ms-{kind}", style={"color": color, "margin": "8px 0"})


def error_message(exc: BaseException) -> html.Div:
    """A user-facing error as a message (a :class:`MechscopeError` says what and how to fix)."""
    text = str(exc) if isinstance(exc, MechscopeError) else f"{type(exc).__name__}: {exc}"
    return message(text, kind="error")


def table(df: pd.DataFrame, *, max_rows: int = 20, id: Any = None) -> DataTable:
    """A read-only table of the first ``max_rows`` rows (numbers rounded for reading)."""
    df = df.head(max_rows).copy()
    for col in df.columns:
        if pd.api.types.is_float_dtype(df[col]):
            df[col] = df[col].round(4)
        elif not pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]):
            df[col] = df[col].astype(str)
    kwargs: dict[str, Any] = {} if id is None else {"id": id}
    return DataTable(
        data=df.to_dict("records"), columns=[{"name": str(c), "id": str(c)} for c in df.columns],
        page_size=max_rows, style_table={"overflowX": "auto"},
        style_cell={"fontFamily": "monospace", "fontSize": "12px", "textAlign": "left"}, **kwargs,
    )  # fmt: skip


def section(sec: Any, *, height: int = 380) -> html.Div:
    """One :class:`mechscope.views.Section`: title, skip reason, figures, table, summary."""
    children: list[Any] = [html.H4(sec.title or sec.name)]
    if getattr(sec, "skipped", None):
        children.append(message(f"skipped: {sec.skipped}", kind="warn"))
    for caption, fig in sec.figures:
        children += [html.Div(caption, style={"fontStyle": "italic"}), graph(fig, height=height)]
    if sec.table is not None and len(sec.table):
        children.append(table(sec.table, max_rows=10))
    if sec.summary:
        text = json.dumps(sec.summary, indent=1, default=str)
        children.append(html.Details([html.Summary("summary"),
                                      html.Pre(text[:4000], style={"fontSize": "11px"})]))  # fmt: skip
    return html.Div(children, className="ms-section", style=_BOX)


def box(children: Any, **style: Any) -> html.Div:
    """A bordered panel."""
    return html.Div(children, style={**_BOX, **style})
