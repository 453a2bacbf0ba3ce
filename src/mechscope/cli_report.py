"""``mechscope report``: one self-contained HTML report of a run (see :mod:`mechscope.report`).

Opens the store read-only. ``--run`` takes a run id (a unique prefix is enough); without it the
newest complete run is reported. With ``--json`` prints one object: ``report`` (the file's
absolute path), ``run_id`` and ``figures`` (how many figures the report holds).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from mechscope.errors import StoreError

StoreOpt = Annotated[Path, typer.Option("--store", help="The store folder holding the run.")]
RunOpt = Annotated[
    str | None,
    typer.Option("--run", help="Run id (a unique prefix is enough); default: the newest complete run."),
]
OutOpt = Annotated[Path, typer.Option("--out", help="The HTML file to write (folders are made).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def report_cmd(
    store: StoreOpt,
    out: OutOpt = Path("report.html"),
    run: RunOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Write a self-contained HTML report of a run (opens offline: plotly.js is inlined)."""
    from mechscope.cli import _emit, _no_store_error
    from mechscope.report import complete_run, write_report_counted
    from mechscope.store import Store

    if not (store / "store.db").is_file():
        raise _no_store_error(store)
    s = Store(store, readonly=True)
    listing = f"`mechscope runs --store {shlex.quote(str(store))}` lists the runs"
    try:
        rec = complete_run(s, run)
    except StoreError as exc:
        text = str(exc)
        raise StoreError(text if "mechscope runs" in text or run is None else f"{text}; {listing}") from None
    path, n = write_report_counted(s, rec.id, out)
    obj = {"report": str(path.resolve()), "run_id": rec.id, "figures": n}
    _emit(obj, as_json, f"report of run {rec.id} ({rec.kind}, {n} figures) written to {obj['report']}\n"
                        f"open it in a browser; it needs no network")  # fmt: skip


__all__ = ["report_cmd"]
