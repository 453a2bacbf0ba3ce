"""The hook-leak fixture itself: it must notice a leaked hook (checked by running it by hand)."""

from __future__ import annotations

import pytest
import torch

import tests.conftest as conftest


def _drive(fixture_fn, monkeypatch, body):
    gen = fixture_fn.__wrapped__(monkeypatch) if hasattr(fixture_fn, "__wrapped__") else fixture_fn(monkeypatch)
    next(gen)
    body()
    with pytest.raises(AssertionError, match="left hooks"):
        next(gen)


def test_fixture_catches_a_leaked_hook_point_hook(tiny):
    mp = pytest.MonkeyPatch()
    try:
        _drive(conftest.no_hook_leaks, mp,
               lambda: tiny.add_hook("blocks.0.attn.hook_z", lambda act, hook: None))
    finally:
        mp.undo()
        tiny.reset_hooks(including_permanent=True)


def test_fixture_catches_a_leaked_module_hook():
    layer = torch.nn.Linear(2, 2)
    mp = pytest.MonkeyPatch()
    try:
        _drive(conftest.no_hook_leaks, mp,
               lambda: layer.register_forward_hook(lambda m, i, o: None))
    finally:
        mp.undo()
    assert len(layer._forward_hooks) == 0  # the fixture cleaned up after reporting
