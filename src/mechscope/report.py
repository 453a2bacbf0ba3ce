"""A self-contained HTML report of one run: every analysis it holds, readable offline.

One file: plotly.js is inlined once in the page's head and each figure is a ``<div>`` drawn by
its own small script, so the report opens from a disk, an e-mail or an air-gapped machine with
no network (no ``<script src>``, no external CSS or fonts). The figures are the ones the
dashboard shows (:mod:`mechscope.views`, drawn by :mod:`mechscope.figures`).

Contents, top to bottom: the run (id, kind, model, fingerprint, seed, times, status, timings); a
summary table with one row per section; the discovered circuit (an SAE circuit's or a
:class:`~mechscope.circuits.graph.Circuit`'s heads, and the reference circuit of an evaluation);
the cross-method agreement view (:func:`~mechscope.figures.head_rank_comparison`) when the run
ranks heads by two methods or more; every section (figures, top rows, summary, or why it was
skipped); provenance (fingerprint, package versions, seed, config). Every text that comes from
the store is HTML-escaped.

:func:`write_report` writes atomically (a temporary file in the same folder, then a rename), so
a failure never leaves a half-written report, and it only reads the store.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from mechscope._fs import apply_umask
from mechscope.errors import InputError, StoreError
from mechscope.figures import head_rank_comparison
from mechscope.results import Result
from mechscope.store import RunRecord, Store
from mechscope.views import Section, head_grids, load_results, sections

#: The class of every figure's ``<div>`` in the report (one per figure; tests count them).
FIGURE_CLASS = "ms-figure"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; }
.skipped { color: #8a5a00; } .caption { color: #555; font-size: .9em; margin: .2em 0; }
.ms-figure { margin: .4em 0 1.2em 0; }
nav a { margin-right: 1em; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _when(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _json(x: Any, limit: int = 4000) -> str:
    text = json.dumps(x, indent=1, default=str, sort_keys=False)
    return text if len(text) <= limit else text[:limit] + "\n... (cut)"


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _frame(frame: pd.DataFrame) -> str:
    def fmt(x: Any) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Figures:
    """Turns figures into ``<div>``s with unique ids, and counts them."""

    def __init__(self) -> None:
        self.n = 0

    def div(self, fig: go.Figure, caption: str = "") -> str:
        self.n += 1
        body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{self.n}",
                           config={"responsive": True, "displaylogo": False})  # fmt: skip
        cap = f'<p class="caption">{_e(caption)}</p>' if caption else ""
        return f'<div class="{FIGURE_CLASS}" id="figure-{self.n}">{cap}{body}</div>'


def _anchor(section: Section, i: int) -> str:
    return f"section-{i}-{''.join(c if c.isalnum() else '-' for c in section.name) or 'run'}"


def _header(rec: RunRecord) -> str:
    rows = [("run", rec.id), ("kind", rec.kind), ("status", rec.status),
            ("model", rec.model_spec or ""), ("model fingerprint", rec.model_fingerprint or ""),
            ("seed", "" if rec.seed is None else rec.seed), ("created", _when(rec.created)),
            ("finished", _when(rec.finished))]  # fmt: skip
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in rec.timings.items())
    rows.append(("timings", timings))
    return f"<h1>mechscope report: {_e(rec.kind)} run {_e(rec.id)}</h1>" + _kv_table(rows)


def _summary_table(parts: list[Section]) -> str:
    head = "<tr><th>section</th><th>kind</th><th>figures</th><th>rows</th><th>status</th></tr>"
    rows = []
    for i, s in enumerate(parts):
        status = f"skipped: {s.skipped}" if s.skipped else "ok"
        n_rows = "" if s.table is None else len(s.table)
        rows.append(f'<tr><td><a href="#{_anchor(s, i)}">{_e(s.title)}</a></td><td>{_e(s.kind)}'
                    f"</td><td>{len(s.figures)}</td><td>{n_rows}</td><td>{_e(status)}</td></tr>")  # fmt: skip
    return f"<h2>Summary</h2><table>{head}{''.join(rows)}</table>"


def _circuits(results: dict[str, Result | str], parts: list[Section]) -> str:
    """The discovered circuit(s): heads and nodes of each SAE circuit / Circuit, and the
    reference circuit of an evaluation; each links to its section's figures."""
    anchors = {s.name: _anchor(s, i) for i, s in enumerate(parts)}
    blocks = []
    for name, r in results.items():
        cls = type(r).__name__
        link = f' (<a href="#{anchors[name]}">figures</a>)' if name in anchors else ""
        circuit: Any = None
        if cls == "SAECircuit":
            circuit = r.circuit()  # type: ignore[union-attr]
        elif cls == "Circuit":
            circuit = r
        if circuit is not None:
            heads = ", ".join(f"L{a}H{h}" for a, h in circuit.heads) or "none"
            method = circuit.method or cls
            blocks.append(f"<h3>{_e(method)} ({_e(name or 'this run')}){link}</h3>"
                          f"<p>heads: {_e(heads)}</p>" + _frame(circuit.to_frame().head(30)))  # fmt: skip
        elif cls == "CircuitEvaluation":
            ev: Any = r
            heads = ", ".join(f"L{a}H{h}" for a, h in ev.members.nonzero().tolist()) or "none"
            blocks.append(f"<h3>reference circuit of {_e(ev.task)} ({_e(ev.reference)}){link}</h3>"
                          f"<p>heads: {_e(heads)}</p>")  # fmt: skip
    if not blocks:
        return ""
    return '<h2 id="circuit">Discovered circuit</h2>' + "".join(blocks)


def _section(s: Section, i: int, figs: _Figures) -> str:
    out = [f'<section id="{_anchor(s, i)}"><h2>{_e(s.title)}</h2>',
           f'<p class="caption">{_e(s.name or "(the run itself)")} &middot; {_e(s.kind)}</p>']  # fmt: skip
    if s.skipped:
        out.append(f'<p class="skipped">skipped: {_e(s.skipped)}</p>')
    out += [figs.div(fig, caption) for caption, fig in s.figures]
    if s.table is not None and len(s.table.columns):
        out.append(_frame(s.table))
    summary = {k: v for k, v in s.summary.items() if k != "skipped"}
    if summary:
        out.append(f"<details><summary>summary</summary><pre>{_e(_json(summary))}</pre></details>")
    out.append("</section>")
    return "".join(out)


def _provenance(rec: RunRecord) -> str:
    rows = [("model", rec.model_spec or ""), ("model fingerprint", rec.model_fingerprint or ""),
            ("seed", "" if rec.seed is None else rec.seed)]  # fmt: skip
    rows += [(f"version: {k}", v) for k, v in sorted(rec.versions.items())]
    return ('<h2 id="provenance">Provenance</h2>' + _kv_table(rows)
            + f"<h3>config</h3><pre>{_e(_json(rec.config, limit=20000))}</pre>")  # fmt: skip


def complete_run(store: Store, run_id: str | None) -> RunRecord:
    """The run a report is about: ``run_id`` (a unique prefix is enough), or with None the
    newest complete run.

    Raises:
        StoreError: no such run, no complete run in the store, or a run that is not complete.
    """
    if run_id is None:
        try:
            return store.latest()
        except StoreError:
            raise StoreError(f"no complete run in {store.root}; make one with `mechscope demo "
                             f"--store {store.root}`") from None  # fmt: skip
    rec = store.get_run(run_id)
    if rec.status != "complete":
        why = f": {rec.error}" if rec.error else ""
        raise StoreError(f"run {rec.id} is {rec.status}{why}; only a complete run has a report "
                         "(`mechscope runs --store DIR` lists the runs)")  # fmt: skip
    return rec


def build_report(store: Store, run_id: str | None) -> tuple[str, int]:
    """The report of a run as HTML, and how many figures it holds (see :func:`render_report`)."""
    from plotly.offline import get_plotlyjs

    rec = complete_run(store, run_id)
    results = load_results(store, rec.id)
    parts = sections(store, rec.id, results=results)
    grids = head_grids(store, rec.id, results=results)
    figs = _Figures()
    circuit = _circuits(results, parts)
    links = [("summary", "summary")] + ([("circuit", "circuit")] if circuit else [])
    links += ([("agreement", "agreement")] if len(grids) >= 2 else []) + [("provenance",
                                                                         "provenance")]
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in links)
    body = [_header(rec), f"<nav>{nav}</nav>",
            f'<div id="summary">{_summary_table(parts)}</div>', circuit]  # fmt: skip
    if len(grids) >= 2:
        body.append('<h2 id="agreement">Cross-method agreement</h2><p class="caption">the same '
                    f"heads as ranked by each method: {_e(', '.join(grids))}</p>")  # fmt: skip
        body.append(figs.div(head_rank_comparison(grids), "head ranks per method"))
    body += [_section(s, i, figs) for i, s in enumerate(parts)]
    body.append(_provenance(rec))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>mechscope report {_e(rec.id)}</title><style>{_CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
            f"<body>{''.join(body)}</body></html>\n")  # fmt: skip
    return page, figs.n


def render_report(store: Store, run_id: str | None) -> str:
    """The self-contained HTML report of a run (None: the newest complete run).

    Raises:
        StoreError: no such run, or a run that is not complete.
    """
    return build_report(store, run_id)[0]


def write_report(store: Store, run_id: str | None, out: str | Path) -> Path:
    """Write the report of a run (None: the newest complete run) to the file ``out`` (its
    folders are made); returns ``out``. Atomic: the file appears whole or not at all.

    Raises:
        InputError: ``out`` is a folder.
        StoreError: no such run, or a run that is not complete.
    """
    return write_report_counted(store, run_id, out)[0]


def write_report_counted(store: Store, run_id: str | None, out: str | Path) -> tuple[Path, int]:
    """:func:`write_report`, also returning the number of figures in the report."""
    path = Path(out)
    if path.is_dir():
        raise InputError(f"the report path {path} is a folder; give a file name, e.g. {path / 'report.html'}")
    page, n = build_report(store, run_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write the report into {path.parent}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
            fh.flush()
            os.fsync(fh.fileno())
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path, n


__all__ = [
    "FIGURE_CLASS",
    "build_report",
    "complete_run",
    "render_report",
    "write_report",
    "write_report_counted",
]
