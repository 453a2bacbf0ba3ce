"""Shared fixtures. The autouse ``no_hook_leaks`` fixture fails any test that leaves a hook on a
model: every hook point that received a hook during the test must be empty at its end."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=1"
TINY_ATTN = (
    "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_vocab=50,n_ctx=32,attn_only=true,seed=2"
)


@pytest.fixture(autouse=True)
def no_hook_leaks(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if any hook point it touched still holds a hook when it ends."""
    from transformer_lens.hook_points import HookPoint

    touched: list[weakref.ref] = []
    original = HookPoint.add_hook

    def recording_add_hook(self, *args, **kwargs):
        touched.append(weakref.ref(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HookPoint, "add_hook", recording_add_hook)
    yield
    leaks = []
    for ref in touched:
        hp = ref()
        if hp is not None and (hp.fwd_hooks or hp.bwd_hooks):
            leaks.append(hp.name)
            hp.remove_hooks("both", including_permanent=True)
    global_hooks = len(torch.nn.modules.module._global_forward_hooks)
    assert not leaks, f"test left hooks attached on {sorted(set(leaks))}"
    assert global_hooks == 0, "test left a global torch forward hook"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"expected the shared data folder at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture
def tiny():
    from mechscope.models import load

    return load(TINY)


@pytest.fixture
def tiny_attn():
    from mechscope.models import load

    return load(TINY_ATTN)


@pytest.fixture(scope="session")
def smollm2():
    from mechscope.models import load

    return load("smollm2")


@pytest.fixture(scope="session")
def minilm():
    from mechscope.models import load

    return load("minilm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/real/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.real)
