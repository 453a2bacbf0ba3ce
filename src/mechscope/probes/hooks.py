"""The one module of mechscope that attaches hooks to a model.

Everything else (the tracer, patching, ablations, zoo ground truth) goes through
:func:`hooked`, a context manager that checks every hook name against the model before attaching
anything and removes every hook it attached on exit, also when the body raises. Interventions are
plain data: a hook name plus a function ``(activation, hook) -> activation | None``.

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8,attn_only=true")
>>> seen = []
>>> def grab(act, hook):
...     seen.append(act.shape)
>>> with hooked(model, [("blocks.0.attn.hook_z", grab)]):
...     _ = model(torch.tensor([[0, 1, 2]]))
>>> seen  # [batch, pos, head, d_head]
[torch.Size([1, 3, 2, 8])]
>>> count_hooks(model)
0
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mechscope.errors import HookNameError

HookFn = Callable[..., Any]
FwdHooks = Sequence[tuple[str, HookFn]]


def hook_names(model: Any) -> list[str]:
    """Every hook point name of ``model`` (a ``TransformerBridge``)."""
    return list(model.hook_dict.keys())


def check_hook_name(model: Any, name: str) -> None:
    """Raise :class:`HookNameError` with close matches when ``model`` has no hook ``name``."""
    names = model.hook_dict
    if name in names:
        return
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", "?")
    raise HookNameError(
        f"the model has no hook point {name!r} (it has {n_layers} layers).{hint} "
        "List them with mechscope.probes.hooks.hook_names(model)."
    )


@contextmanager
def hooked(model: Any, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = ()) -> Iterator[Any]:
    """Attach forward (and backward) hooks for the body of a ``with`` block.

    Args:
        model: a ``TransformerBridge``.
        fwd_hooks: ``(hook_name, fn)`` pairs; ``fn(activation, hook)`` may return a replacement.
        bwd_hooks: the same for gradients.

    Every name is checked before any hook is attached, so a typo attaches nothing.
    """
    for name, fn in [*fwd_hooks, *bwd_hooks]:
        check_hook_name(model, name)
        if not callable(fn):
            raise TypeError(f"the hook for {name!r} is not callable: {fn!r}")
    with model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), reset_hooks_end=True):
        yield model


def count_hooks(model: Any) -> int:
    """Hook functions currently attached to the hook points of ``model``.

    (TransformerLens itself keeps internal pre-hooks on some normalisation modules; those are
    not mechscope's and are not counted.)
    """
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
