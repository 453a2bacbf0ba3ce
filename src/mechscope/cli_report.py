"""``mechscope report``: one self-contained HTML report of a run (being built)."""

from __future__ import annotations

from mechscope.errors import MechscopeError


def report_cmd() -> None:
    """Write a self-contained HTML report of a run."""
    raise MechscopeError("mechscope report is not built yet")
