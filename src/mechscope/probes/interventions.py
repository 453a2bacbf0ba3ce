"""Interventions: every change to a forward pass, as frozen data, applied by one context manager.

An intervention names *where* (a site of :mod:`mechscope.probes.sites`, a layer, optionally some
heads and some positions, exactly as the tracer addresses them) and *what* (patch in a value from
another run, zero / mean / resample ablation, scale, add a vector, or any function).
:func:`intervene` applies a list of them for the body of a ``with`` block, through
:func:`mechscope.probes.hooks.hooked` (the one place hooks are attached), and removes them on exit.
Activation patching, ablations, causal tracing, head reinforcement, sink calibration and injection
are all written with it.

Semantics, for one intervention on an activation ``act`` of its hook point:

- the intervention computes a full-shape ``new`` value (``Patch``: the source; ``Zero``: zeros;
  ``Scale``: ``act * factor``; ...);
- the output is ``new`` on the selected heads x positions and ``act`` everywhere else
  (``torch.where``), so unselected entries are untouched bit for bit;
- ``heads`` index the site's head axis (for ``k``/``v`` on a grouped-query model: key/value
  heads); ``positions`` index its position axis (the *query* axis of ``patterns`` and
  ``attn_scores``). Positions are a tuple of ints shared by every row (negative ints count from
  the end of the padded sequence) or an integer tensor ``[batch, n_pos]`` of absolute positions
  per row (for padded batches, e.g. ``task.answer_pos[:, None]``);
- several interventions on the same hook point apply in list order; nested ``intervene`` blocks
  apply outer first, then inner; a :class:`~mechscope.probes.Tracer` on the same hook point
  always records the value after every intervention (readers run after writers).

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> tokens = torch.tensor([[1, 2, 3, 4]])
>>> clean = model(tokens)
>>> with intervene(model, [Scale(site="heads", layer=1, heads=(0,), factor=1.0)]):
...     same = model(tokens)
>>> torch.equal(same, clean)
True
>>> with intervene(model, [Zero(site="heads", layer=1, heads=(0,), positions=(-1,))]):
...     ablated = model(tokens)
>>> torch.equal(ablated[:, :-1], clean[:, :-1]), torch.equal(ablated[:, -1], clean[:, -1])
(True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.probes.hooks import hooked
from mechscope.probes.sites import SITE_SPECS, check_site, check_site_on_model, hook_for
from mechscope.types import Model

if TYPE_CHECKING:
    from mechscope.probes.trace import Trace

#: Sites computed by the tracer from another hook, which have no hook point of their own.
COMPUTED_SITES = frozenset({"head_resid"})

Positions = tuple[int, ...] | Tensor | None


@dataclass(frozen=True, kw_only=True, eq=False)
class Intervention:
    """Where an intervention acts; subclasses say what it does (:meth:`new_value`).

    Attributes:
        site: a site name (``heads``, ``resid_pre``, ``patterns``, ...).
        layer: the layer (negative counts from the last).
        heads: heads to act on (site must have a head axis); None for all.
        positions: positions to act on (see the module docstring); None for all.
    """

    site: str
    layer: int
    heads: tuple[int, ...] | None = None
    positions: Positions = None

    # -- what ------------------------------------------------------------------------------
    def new_value(self, act: Tensor) -> Tensor:
        """The full-shape replacement candidate for ``act`` (only the selection is used)."""
        raise NotImplementedError

    # -- where -----------------------------------------------------------------------------
    @property
    def hook_name(self) -> str:
        return hook_for(self.site, self.layer)

    def resolved(self, model: Model) -> Intervention:
        """This intervention checked against ``model``, with a non-negative layer."""
        check_site(self.site)
        if self.site in COMPUTED_SITES:
            raise InputError(
                f"site {self.site!r} is computed by the tracer, not a hook point; intervene on "
                "'heads' (hook_z) instead, which is what it is computed from"
            )
        n_layers = int(model.cfg.n_layers)
        if not -n_layers <= self.layer < n_layers:
            raise InputError(
                f"layer {self.layer} out of range for {type(self).__name__} on {self.site!r}; "
                f"the model has {n_layers} layers (0..{n_layers - 1})"
            )
        check_site_on_model(model, self.site, [self.layer % n_layers])
        spec = SITE_SPECS[self.site]
        if self.heads is not None:
            if spec.head_axis is None:
                raise InputError(f"site {self.site!r} has no head axis; drop heads= or use 'heads'")
            n = _n_heads(model, self.site)
            bad = [h for h in self.heads if not 0 <= h < n]
            if bad or not self.heads:
                raise InputError(f"heads {list(self.heads)} out of range for {self.site!r}; "
                                 f"it has {n} heads (0..{n - 1})")
        if isinstance(self.positions, Tensor):
            if self.positions.ndim != 2 or self.positions.dtype.is_floating_point:
                raise InputError("positions as a tensor must be integer [batch, n_pos]; got "
                                 f"{self.positions.dtype} {tuple(self.positions.shape)}")
        elif self.positions is not None and not self.positions:
            raise InputError("positions=() selects nothing; pass None for all positions")
        self.check(model)
        layer = self.layer % n_layers
        return self if layer == self.layer else _replace_layer(self, layer)

    def check(self, model: Model) -> None:  # noqa: B027  (optional for subclasses)
        """Subclass hook for extra checks against the model."""

    def mask(self, act: Tensor) -> Tensor | None:
        """A boolean mask broadcastable to ``act`` that selects heads x positions (None: all)."""
        spec = SITE_SPECS[self.site]
        mask: Tensor | None = None
        if self.heads is not None and spec.head_axis is not None:
            shape = [1] * act.ndim
            shape[spec.head_axis] = act.shape[spec.head_axis]
            m = torch.zeros(act.shape[spec.head_axis], dtype=torch.bool, device=act.device)
            m[list(self.heads)] = True
            mask = m.view(shape)
        if self.positions is not None:
            axis = spec.pos_axes[0]
            n_pos = act.shape[axis]
            shape = [1] * act.ndim
            shape[axis] = n_pos
            if isinstance(self.positions, Tensor):
                pos = self.positions.to(act.device).long()
                if pos.shape[0] != act.shape[0]:
                    raise InputError(f"positions has {pos.shape[0]} rows but the batch has "
                                     f"{act.shape[0]}; give one row of positions per prompt")
                _check_positions(pos, n_pos)
                m = torch.zeros(act.shape[0], n_pos, dtype=torch.bool, device=act.device)
                m.scatter_(1, pos, True)
                shape[0] = act.shape[0]
            else:
                pos = torch.tensor(self.positions)
                _check_positions(pos, n_pos)
                m = torch.zeros(n_pos, dtype=torch.bool, device=act.device)
                m[pos % n_pos] = True
            m = m.view(shape)
            mask = m if mask is None else mask & m
        return mask

    def apply(self, act: Tensor) -> Tensor:
        """The activation after this intervention."""
        new = self.new_value(act)
        if new.shape != act.shape:
            raise InputError(f"{type(self).__name__} on {self.site}.{self.layer} produced shape "
                             f"{tuple(new.shape)} for an activation of shape {tuple(act.shape)}")
        new = new.to(dtype=act.dtype, device=act.device)
        mask = self.mask(act)
        return new if mask is None else torch.where(mask, new, act)


def _replace_layer(spec: Intervention, layer: int) -> Intervention:
    from dataclasses import replace

    return replace(spec, layer=layer)


def _n_heads(model: Model, site: str) -> int:
    spec = SITE_SPECS[site]
    if spec.kv:
        return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    return int(model.cfg.n_heads)


def _check_positions(pos: Tensor, n_pos: int) -> None:
    if pos.numel() and (int(pos.min()) < -n_pos or int(pos.max()) >= n_pos):
        raise InputError(f"positions {pos.tolist()} fall outside a sequence of {n_pos} tokens")


def _source_tensor(source: Tensor | Trace, site: str, layer: int) -> Tensor:
    if isinstance(source, Tensor):
        return source
    if source.positions is not None or source.meta.get("heads") is not None:
        raise InputError(
            "the source trace was captured with positions= or heads= restrictions; patch sources "
            "need the full activation: trace the source run without positions/heads"
        )
    return source.get(site, layer)


def _match_batch(src: Tensor, act: Tensor, what: str) -> Tensor:
    if src.shape == act.shape:
        return src
    if src.ndim == act.ndim and src.shape[1:] == act.shape[1:] and src.shape[0] == 1:
        return src.expand_as(act)
    raise InputError(
        f"{what} has shape {tuple(src.shape)} but the activation has shape {tuple(act.shape)}; "
        "the source and patched runs must have the same number of tokens (pad clean and corrupt "
        "prompts to equal length) and the same batch size (or a batch of 1)"
    )


# ---------------------------------------------------------------------------------------------
# The interventions.


@dataclass(frozen=True, kw_only=True, eq=False)
class Patch(Intervention):
    """Write the value of another run: ``source`` is a full :class:`Trace` of that run (all
    positions and heads of this site) or a tensor of the activation's shape (batch 1 broadcasts)."""

    source: Tensor | Trace

    def new_value(self, act: Tensor) -> Tensor:
        src = _source_tensor(self.source, self.site, self.layer)
        return _match_batch(src, act, f"the patch source for {self.site}.{self.layer}")


@dataclass(frozen=True, kw_only=True, eq=False)
class Zero(Intervention):
    """Zero ablation."""

    def new_value(self, act: Tensor) -> Tensor:
        return torch.zeros_like(act)


@dataclass(frozen=True, kw_only=True, eq=False)
class MeanAblate(Intervention):
    """Mean ablation: the mean of ``source`` over its batch (``over="batch"``, per position) or
    over batch and positions (``over="batch_pos"``)."""

    source: Tensor | Trace
    over: Literal["batch", "batch_pos"] = "batch"

    def new_value(self, act: Tensor) -> Tensor:
        src = _source_tensor(self.source, self.site, self.layer)
        if self.over == "batch_pos":
            axis = SITE_SPECS[self.site].pos_axes[0]
            mean = src.float().mean(dim=(0, axis), keepdim=True)
            shape = list(act.shape)
            shape[0] = 1
            return mean.expand(shape).expand_as(act)
        return _match_batch(src.float().mean(0, keepdim=True), act, f"the mean of {self.site}")


@dataclass(frozen=True, kw_only=True, eq=False)
class Resample(Intervention):
    """Resample ablation: each row gets the activation of a random row of ``source`` (drawn with
    replacement by a generator seeded with ``seed``, the same draw on every forward)."""

    source: Tensor | Trace
    seed: int = 0

    def new_value(self, act: Tensor) -> Tensor:
        src = _source_tensor(self.source, self.site, self.layer)
        gen = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, src.shape[0], (act.shape[0],), generator=gen)
        return _match_batch(src[rows.to(src.device)], act, f"the resample source of {self.site}")


@dataclass(frozen=True, kw_only=True, eq=False)
class Scale(Intervention):
    """Multiply by ``factor`` (1 is the identity, bit for bit)."""

    factor: float

    def new_value(self, act: Tensor) -> Tensor:
        return act * self.factor if self.factor != 1.0 else act


@dataclass(frozen=True, kw_only=True, eq=False)
class AddVector(Intervention):
    """Add ``vector`` (broadcast against the activation, e.g. ``[d_model]`` on residual sites)."""

    vector: Tensor

    def new_value(self, act: Tensor) -> Tensor:
        try:
            return act + self.vector.to(act.device, act.dtype)
        except RuntimeError:
            raise InputError(f"a vector of shape {tuple(self.vector.shape)} does not broadcast "
                             f"against {self.site} of shape {tuple(act.shape)}") from None


@dataclass(frozen=True, kw_only=True, eq=False)
class Apply(Intervention):
    """Any function ``fn(act) -> act`` of the same shape (only the selection is kept)."""

    fn: Callable[[Tensor], Tensor] = field(repr=False)

    def new_value(self, act: Tensor) -> Tensor:
        return self.fn(act)


# ---------------------------------------------------------------------------------------------


def intervention_hooks(model: Model, specs: Sequence[Intervention]) -> list[tuple[str, Any]]:
    """``(hook_name, fn)`` pairs applying ``specs`` (one function per hook point, in order)."""
    resolved = [_resolve(model, s) for s in specs]
    by_hook: dict[str, list[Intervention]] = {}
    for spec in resolved:
        by_hook.setdefault(spec.hook_name, []).append(spec)

    def make(group: list[Intervention]) -> Callable[..., Tensor]:
        def fn(act: Tensor, hook: Any) -> Tensor:
            for spec in group:
                act = spec.apply(act)
            return act

        return fn

    return [(name, make(group)) for name, group in by_hook.items()]


def _resolve(model: Model, spec: Any) -> Intervention:
    if not isinstance(spec, Intervention):
        raise InputError(f"expected an Intervention (Patch, Zero, Scale, ...), got {spec!r}")
    return spec.resolved(model)


@contextmanager
def intervene(model: Model, specs: Intervention | Sequence[Intervention]) -> Iterator[Model]:
    """Apply interventions to every forward of ``model`` inside the ``with`` block.

    Every spec is checked (site, layer, heads) before anything is attached; the hooks are removed
    on exit, also on error.
    """
    specs = [specs] if isinstance(specs, Intervention) else list(specs)
    with hooked(model, intervention_hooks(model, specs), role="write"):
        yield model


__all__ = [
    "AddVector",
    "Apply",
    "Intervention",
    "MeanAblate",
    "Patch",
    "Resample",
    "Scale",
    "Zero",
    "intervene",
    "intervention_hooks",
]
