"""The one module of mechscope that attaches hooks to a model.

Everything else (the tracer, interventions, zoo ground truth) goes through :func:`hooked`, a
context manager that checks every hook name and every hook function's signature against the model
before attaching anything, and removes every hook it attached on exit, also when the body raises.
Hook functions are plain data: a hook name plus a function ``fn(activation, hook)`` that returns a
replacement activation or ``None``.

Order on one hook point. Hooks come in two roles: *writers* (``role="write"``, the default:
interventions, anything that may return a replacement) and *readers* (``role="read"``: the
tracer). On every hook point readers run after all writers, whatever the order in which they were
attached, so a trace recorded inside :func:`mechscope.probes.intervene` records the patched value.
Writers run in the order they were attached (an inner ``with`` block's writer runs after, and so
acts on the output of, an outer one's).

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8,attn_only=true")
>>> seen = []
>>> def grab(act, hook):
...     seen.append(act.shape)
>>> with hooked(model, [("blocks.0.attn.hook_z", grab)], role="read"):
...     _ = model(torch.tensor([[0, 1, 2]]))
>>> seen  # [batch, pos, head, d_head]
[torch.Size([1, 3, 2, 8])]
>>> count_hooks(model)
0
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from mechscope.errors import HookNameError, InputError
from mechscope.types import Model

HookFn = Callable[..., Any]
FwdHooks = Sequence[tuple[str, HookFn]]
Role = Literal["write", "read"]


def hook_names(model: Model) -> list[str]:
    """Every hook point name of ``model`` (aliases included)."""
    return list(model.hook_dict.keys())


def check_hook_name(model: Model, name: str) -> None:
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


def check_hook_fn(name: str, fn: Any) -> None:
    """Raise :class:`InputError` unless ``fn`` can be called as ``fn(activation, hook=point)``.

    TransformerLens passes the hook point by keyword, so ``lambda a, h: ...`` would fail only in
    the middle of a forward; this catches it before anything is attached.

    >>> check_hook_fn("hook_embed", lambda act, hook: None)
    >>> check_hook_fn("hook_embed", lambda a, h: None)
    Traceback (most recent call last):
    ...
    mechscope.errors.InputError: the hook for 'hook_embed' cannot be called as fn(activation, hook=...) ...
    """
    if not callable(fn):
        raise InputError(f"the hook for {name!r} is not callable: {fn!r}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; let them through
        return
    try:
        sig.bind(None, hook=None)
    except TypeError:
        raise InputError(
            f"the hook for {name!r} cannot be called as fn(activation, hook=...) ... its signature "
            f"is {sig}; TransformerLens passes the hook point as the keyword `hook`, so write "
            "`def fn(act, hook): ...`"
        ) from None


class _Reader:
    """Marks a hook function as a reader, so writers can be kept in front of it."""

    __slots__ = ("fn",)

    def __init__(self, fn: HookFn) -> None:
        self.fn = fn

    def __call__(self, act: Any, hook: Any) -> None:
        self.fn(act, hook=hook)  # a reader's return value is ignored: it never replaces

    def __repr__(self) -> str:
        return f"reader({self.fn!r})"


def _readers_last(point: Any) -> None:
    """Move the reader hooks of one hook point behind its writers, keeping relative order."""
    readers = [h for h in point.fwd_hooks if isinstance(h.user_hook, _Reader)]
    if not readers:
        return
    for handle in readers:
        point._forward_hooks.move_to_end(handle.hook.id)
    point.fwd_hooks[:] = [h for h in point.fwd_hooks if not isinstance(h.user_hook, _Reader)] + readers


@contextmanager
def hooked(model: Model, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = (), *,
           role: Role = "write") -> Iterator[Model]:
    """Attach forward (and backward) hooks for the body of a ``with`` block.

    Args:
        model: a ``TransformerBridge``.
        fwd_hooks: ``(hook_name, fn)`` pairs; ``fn(activation, hook)`` may return a replacement.
        bwd_hooks: the same for gradients.
        role: ``"write"`` (may replace the activation) or ``"read"`` (only looks; runs after
            every writer on the same hook point, and its return value is ignored).

    Every name and signature is checked before any hook is attached, so a typo attaches nothing.
    """
    if role not in ("write", "read"):
        raise InputError(f"role must be 'write' or 'read', got {role!r}")
    for name, fn in [*fwd_hooks, *bwd_hooks]:
        check_hook_name(model, name)
        check_hook_fn(name, fn)
    fwd = [(name, _Reader(fn) if role == "read" else fn) for name, fn in fwd_hooks]
    with model.hooks(fwd_hooks=fwd, bwd_hooks=list(bwd_hooks), reset_hooks_end=True):
        if role == "write":
            for point in {id(p): p for p in (model.hook_dict[n] for n, _ in fwd)}.values():
                _readers_last(point)
        yield model


def count_hooks(model: Model) -> int:
    """Hook functions currently attached to the hook points of ``model``.

    Each hook point is counted once, also when it is reachable under several names (the bridge
    aliases e.g. ``blocks.0.hook_resid_pre`` and ``blocks.0.hook_in``). TransformerLens's own
    wiring is not mechscope's and is not counted: its permanent hooks (the BERT adapter wires
    its MLP hook points with some) and its internal pre-hooks on normalisation modules.
    """
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(not h.is_permanent for hp in points for h in [*hp.fwd_hooks, *hp.bwd_hooks])
