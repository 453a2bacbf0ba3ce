"""``mechscope app``: the Dash dashboard over a run store (being built)."""

from __future__ import annotations

from mechscope.errors import MechscopeError


def app_cmd() -> None:
    """Open the dashboard over a run store."""
    raise MechscopeError("mechscope app is not built yet")
