"""Shared fixtures. The autouse ``no_hook_leaks`` fixture fails any test that leaves a hook on a
model: every hook point that received a hook during the test must be empty at its end."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=1"
TINY_ATTN = (
    "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_vocab=50,n_ctx=32,attn_only=true,seed=2"
)


_LIBRARY_DIRS = ("transformer_lens", os.sep + "torch" + os.sep, "transformers")


@pytest.fixture(autouse=True)
def no_hook_leaks(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if it leaves a hook behind on any model.

    Two nets: every TransformerLens hook point that received a hook during the test must be empty
    at its end, and every raw torch module hook registered during the test (outside
    TransformerLens's and torch's own internals, which keep a few permanent ones) must be gone.
    """
    import sys

    from transformer_lens.hook_points import HookPoint

    touched: list[weakref.ref] = []
    module_hooks: list[tuple[weakref.ref, str, int]] = []
    original_add = HookPoint.add_hook

    def recording_add_hook(self, *args, **kwargs):
        touched.append(weakref.ref(self))
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(HookPoint, "add_hook", recording_add_hook)

    def wrap(method_name: str, store_name: str):
        original = getattr(torch.nn.Module, method_name)

        def recording(self, *args, **kwargs):
            handle = original(self, *args, **kwargs)
            caller = sys._getframe(1).f_code.co_filename
            if not any(d in caller for d in _LIBRARY_DIRS):
                module_hooks.append((weakref.ref(self), store_name, handle.id))
            return handle

        monkeypatch.setattr(torch.nn.Module, method_name, recording)

    wrap("register_forward_hook", "_forward_hooks")
    wrap("register_forward_pre_hook", "_forward_pre_hooks")
    wrap("register_full_backward_hook", "_backward_hooks")
    yield
    leaks = []
    for ref in touched:
        hp = ref()
        # permanent hooks are TransformerLens's own wiring (e.g. the BERT adapter's, added when
        # a model is loaded inside a test); mechscope only ever attaches temporary ones
        if hp is not None and any(not h.is_permanent for h in [*hp.fwd_hooks, *hp.bwd_hooks]):
            leaks.append(hp.name)
            hp.remove_hooks("both", including_permanent=False)
    for ref, store_name, hook_id in module_hooks:
        module = ref()
        if module is not None and hook_id in getattr(module, store_name):
            leaks.append(f"{type(module).__name__}.{store_name}")
            getattr(module, store_name).pop(hook_id)
    global_hooks = len(torch.nn.modules.module._global_forward_hooks)
    assert not leaks, f"test left hooks attached on {sorted(set(leaks))}"
    assert global_hooks == 0, "test left a global torch forward hook"


def _toy_task(seed: int = 0):
    """A 3 x 8 clean/corrupt batch for a tiny d_vocab=50 model: the rows differ at position 3 only,
    answers scored at position 7."""
    from mechscope.tasks.base import TaskBatch

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (3, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 7) % 50  # first difference at position 3
    return TaskBatch(task="toy", clean=clean, corrupt=corrupt, answer=torch.tensor([1, 2, 3]),
                     corrupt_answer=torch.tensor([4, 5, 6]), answer_pos=torch.tensor([7, 7, 7]),
                     seed=seed)


@pytest.fixture
def toy_task():
    """Makes the patching tests' toy batch: ``toy_task(seed=0)``."""
    return _toy_task


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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the session (2 CPUs, loopback only), started by the first test
    that asks for it; the model-holding actors of ``mechscope.scale`` are ended after the
    session, then the cluster."""
    import ray  # in the test extra (users get it with the ray extra)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", logging_level="ERROR")
    yield ray
    from mechscope.scale import shutdown_workers

    shutdown_workers()
    if started:
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/real/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.real)


class CLI:
    """Run ``mechscope`` in-process: ``run`` expects an exit (returns code, stdout, stderr),
    ``json`` expects success and parses the one JSON object on stdout."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def run(self, *argv: str) -> tuple[int | str | None, str, str]:
        from mechscope.cli import main

        with pytest.raises(SystemExit) as info:
            main(list(argv))
        out = self.capsys.readouterr()
        return info.value.code, out.out, out.err

    def json(self, *argv: str) -> Any:
        import json

        from mechscope.cli import main

        main(list(argv))
        return json.loads(self.capsys.readouterr().out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CLI:
    """The command line, run in-process (see :class:`CLI`)."""
    return CLI(capsys)
