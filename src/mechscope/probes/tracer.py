"""The tracer: capture per-head outputs, attention patterns, FFN activations and the residual stream.

A :class:`Tracer` is a context manager over one model. Inside the ``with`` block its hooks are
attached (through :func:`mechscope.probes.hooks.hooked`, the one place hooks are registered);
on exit they are removed, also when a forward raises. ``run`` batches prompts, right-pads them
with an attention mask, and returns a :class:`~mechscope.probes.trace.Trace` in memory, or
streams one safetensors shard per batch to a folder so memory does not grow with the number of
prompts. Before any forward, prompts are checked against the context (no silent truncation) and
the run's size against a memory budget (:mod:`mechscope.probes.budget`). With ``grad=True``
(:func:`trace_with_grad`) it also returns ``d metric / d activation`` for attribution patching.

Per-head residual contributions (``head_resid`` = ``z @ W_O``) are computed in the hook from the
captured ``hook_z`` (only for the selected heads and positions) instead of enabling
TransformerLens's ``use_attn_result``, which would materialise them for every head.

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8")
>>> with Tracer(model, sites=("heads", "patterns"), layers=(1,)) as tracer:
...     trace = tracer.run(torch.tensor([[0, 1, 2, 3]]), progress=False)
>>> trace.heads(1).shape, trace.pattern(1).shape
(torch.Size([1, 4, 2, 8]), torch.Size([1, 2, 4, 4]))
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import HookNameError, InputError
from mechscope.metrics import Metric
from mechscope.probes import budget
from mechscope.probes.hooks import hooked
from mechscope.probes.sites import SITE_SPECS, check_site_on_model, hook_for, key_for, parse_sites
from mechscope.probes.tokens import Prompts, tokenize
from mechscope.probes.trace import Trace, TraceWriter, concat_traces
from mechscope.scale import Backend, as_backend
from mechscope.types import Model

__all__ = ["Metric", "Prompts", "TraceConfig", "Tracer", "tokenize", "trace", "trace_with_grad"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """What to capture.

    Attributes:
        sites: site names (see :mod:`mechscope.probes.sites`).
        layers: layers to capture; None for all.
        heads: query heads to keep on head-indexed sites (``heads``, ``head_resid``,
            ``patterns``, ``attn_scores``, ``q``); None for all.
        kv_heads: key/value heads to keep on ``k`` and ``v`` (``n_key_value_heads`` of them);
            None for all, or, on a model without grouped-query attention, the same as ``heads``.
            With ``heads`` set, a GQA model needs ``kv_heads`` for k/v (a query head is not a kv
            head there).
        positions: positions to keep (negative counts from each row's last real token, so
            ``(-1,)`` is the last token of every prompt); None for all.
        dtype: dtype of the stored tensors.
        batch_size: prompts per forward.
        top_k: how many top next-token predictions to keep per prompt.
        max_bytes: memory budget; a run whose estimate (:mod:`mechscope.probes.budget`) is
            larger is refused before any forward. None: ``$MECHSCOPE_MAX_BYTES``, else 4 GiB.
        grad: also capture ``d metric / d activation`` (see :func:`trace_with_grad`).
    """

    sites: tuple[str, ...] = ("heads",)
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    kv_heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    dtype: str = "float32"
    batch_size: int = 8
    top_k: int = 5
    max_bytes: int | None = None
    grad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", parse_sites(self.sites))
        if self.dtype not in _DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; choose from {', '.join(_DTYPES)}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.positions is not None and not self.positions:
            raise InputError("positions=() captures nothing; pass None for all positions")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise InputError(f"max_bytes must be a positive number of bytes, got {self.max_bytes}")


def _check_heads(what: str, heads: tuple[int, ...] | None, n: int) -> None:
    if heads is not None:
        bad = [h for h in heads if not 0 <= h < n]
        if bad:
            raise HookNameError(f"{what} {bad} out of range; the model has {n} {what} per layer")


class Tracer:
    """Capture sites of one model inside a ``with`` block.

    Args:
        model: a ``TransformerBridge``.
        config: a :class:`TraceConfig`; or give its fields as keyword arguments.

    Hooks are attached as readers (``role="read"``), so they run after every intervention's
    writer on the same hook point and record the patched value. A gradient tracer
    (``grad=True``) attaches writers that return the activation unchanged (TransformerLens
    hands a reader a reshaped view that is not on the autograd path); enter it *inside* an
    intervention so that the intervention's writers run first.
    """

    def __init__(self, model: Model, config: TraceConfig | None = None, **fields: Any) -> None:
        config = config or TraceConfig()
        if fields:
            config = replace(config, **fields)
        self.model = model
        self.config = config
        cfg = model.cfg
        n_layers = int(cfg.n_layers)
        layers = config.layers if config.layers is not None else tuple(range(n_layers))
        bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
        if bad:
            raise HookNameError(f"layers {bad} out of range; the model has {n_layers} layers (0..{n_layers - 1})")
        self.layers = tuple(sorted({layer % n_layers for layer in layers}))
        self.n_heads = int(cfg.n_heads)
        self.n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        _check_heads("heads", config.heads, self.n_heads)
        _check_heads("kv heads", config.kv_heads, self.n_kv_heads)
        self.kv_heads = config.kv_heads
        kv_sites = [s for s in config.sites if SITE_SPECS[s].kv]
        if config.kv_heads is None and config.heads is not None and kv_sites:
            if self.n_kv_heads != self.n_heads:
                raise InputError(
                    f"heads={config.heads} selects query heads, but {kv_sites} have "
                    f"{self.n_kv_heads} key/value heads (query head h reads kv head "
                    f"h // {self.n_heads // self.n_kv_heads}); pass kv_heads= for them"
                )
            self.kv_heads = config.heads
        for site in config.sites:
            check_site_on_model(model, site, self.layers)
        self._dtype = _DTYPES[config.dtype]
        self._buffer: dict[str, Tensor] = {}
        self._live: dict[str, Tensor] = {}
        self._positions: Tensor | None = None
        self._stack: contextlib.ExitStack | None = None
        self._w_o: dict[int, Tensor] = {}

    # -- hooks -------------------------------------------------------------------------------
    def _hook_table(self) -> list[tuple[str, Callable[..., Any]]]:
        by_hook: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for layer in self.layers:
            for site in self.config.sites:
                by_hook[hook_for(site, layer)].append((site, layer))
            if self.config.grad and "head_resid" in self.config.sites:
                by_hook[hook_for("attn_out", layer)] += []  # d/d attn_out, for head_resid grads
        return [(name, self._make_hook(name, targets)) for name, targets in by_hook.items()]

    def _select(self, site: str, act: Tensor) -> Tensor:
        spec = SITE_SPECS[site]
        heads = self.kv_heads if spec.kv else self.config.heads
        if heads is not None and spec.head_axis is not None:
            act = act.index_select(spec.head_axis, torch.tensor(heads, device=act.device))
        if self._positions is not None:
            axis = spec.pos_axes[0]
            pos = self._positions.to(act.device)  # [batch, n_pos]
            moved = act.movedim(axis, 1)  # [batch, pos, ...]
            index = pos.view(*pos.shape, *([1] * (moved.ndim - 2))).expand(
                -1, -1, *moved.shape[2:])
            act = moved.gather(1, index).movedim(1, axis)
        return act

    def _make_hook(self, name: str, targets: list[tuple[str, int]]) -> Callable[..., Any]:
        grad = self.config.grad

        def hook(act: Tensor, hook: Any) -> Tensor | None:
            if grad:
                self._live[name] = act
            for site, layer in targets:
                sel = self._select(site, act.detach())
                if site == "head_resid":
                    sel = torch.einsum("bphd,hdm->bphm", sel, self._w_o_for(layer).to(sel.dtype))
                self._buffer[key_for(site, layer)] = sel.to(self._dtype, copy=True)
            return act if grad else None  # a gradient tracer keeps `act` on the autograd path

        return hook

    def _w_o_for(self, layer: int) -> Tensor:
        if layer not in self._w_o:
            w_o = self.model.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
            if self.config.heads is not None:
                w_o = w_o[list(self.config.heads)]
            self._w_o[layer] = w_o
        return self._w_o[layer]

    def __enter__(self) -> Tracer:
        stack = contextlib.ExitStack()
        table = self._hook_table()
        if self.config.grad:
            stack.enter_context(hooked(self.model, table, role="write"))
        else:
            stack.enter_context(hooked(self.model, table, role="read"))
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self._buffer, self._live = {}, {}
        if stack is not None:
            stack.close()

    # -- running -----------------------------------------------------------------------------
    def _resolve_positions(self, lengths: Tensor) -> Tensor | None:
        if self.config.positions is None:
            return None
        pos = torch.tensor(self.config.positions)[None, :].expand(len(lengths), -1)
        pos = torch.where(pos < 0, pos + lengths[:, None], pos)
        if bool((pos < 0).any()) or bool((pos >= lengths[:, None]).any()):
            raise InputError(
                f"positions {self.config.positions} fall outside a prompt of length "
                f"{int(lengths.min())}; use positions that exist in every prompt"
            )
        return pos

    def forward(self, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"] | None = None,
                *, metric: Metric | None = None) -> tuple[Float[Tensor, "batch pos vocab"], Trace]:
        """One forward on a right-padded batch; returns the logits and what was captured.

        A gradient tracer needs ``metric(logits) -> scalar``; the trace's ``grads`` then hold
        ``d metric / d activation`` from one backward.
        """
        if self._stack is None:
            raise RuntimeError("use the Tracer as a context manager: `with Tracer(model) as t:`")
        if self.config.grad and metric is None:
            raise InputError("a gradient tracer (grad=True) needs metric=fn(logits) -> scalar")
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1])
        self._positions = self._resolve_positions(lengths)
        self._buffer, self._live = {}, {}
        device = getattr(self.model.cfg, "device", None) or "cpu"
        kwargs: dict[str, Any] = {}
        if bool((lengths < tokens.shape[1]).any()):
            mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
            kwargs["attention_mask"] = mask.long().to(device)
        grads: dict[str, Tensor] = {}
        try:
            with torch.enable_grad() if self.config.grad else torch.no_grad():
                logits = self.model(tokens.to(device), **kwargs)
                if metric is not None and self.config.grad:
                    grads = self._grads(metric(logits))
        finally:
            self._live = {}
        logits = logits.detach()
        rows = torch.arange(tokens.shape[0])
        last = logits[rows, (lengths - 1).to(logits.device)].float()
        if not bool(torch.isfinite(last).all()):
            raise InputError("the forward produced NaN or inf logits; check the weights and inputs")
        top = last.log_softmax(-1).topk(min(self.config.top_k, last.shape[-1]), dim=-1)
        trace = Trace(
            tensors=dict(self._buffer),
            tokens=tokens.cpu(),
            lengths=lengths.cpu(),
            top_tokens=top.indices.cpu(),
            top_logprobs=top.values.cpu(),
            positions=self._positions,
            meta=self._meta(),
            grads=grads,
        )
        self._buffer = {}
        return logits, trace

    def _grads(self, value: Tensor) -> dict[str, Tensor]:
        """``d value / d activation`` for every captured key, selected like the activations."""
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise InputError("metric(logits) must return a scalar tensor (e.g. a mean or a sum)")
        names = [n for n, a in self._live.items() if a.requires_grad]
        if not value.requires_grad or not names:
            raise InputError(
                "the metric does not depend on the captured activations through autograd; "
                "check that the model's parameters require grad and the metric uses the logits"
            )
        found = torch.autograd.grad(value, [self._live[n] for n in names], allow_unused=True)
        by_name = dict(zip(names, found, strict=True))
        # Not on the path (unused, or replaced by a constant upstream): the gradient is zero.
        raw = {n: g if (g := by_name.get(n)) is not None else torch.zeros_like(a)
               for n, a in self._live.items()}
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            for site in self.config.sites:
                key = key_for(site, layer)
                if site == "head_resid":
                    # attn_out = sum_h head_resid_h + b_O, so d m/d head_resid_h = d m/d attn_out.
                    g = self._select("attn_out", raw[hook_for("attn_out", layer)])
                    n = self._buffer[key].shape[2]
                    sel = g.unsqueeze(2).expand(-1, -1, n, -1)
                else:
                    sel = self._select(site, raw[hook_for(site, layer)])
                out[key] = sel.detach().to(self._dtype, copy=True)
        return out

    def _meta(self) -> dict[str, Any]:
        from mechscope.models.loading import spec_of

        cfg = self.model.cfg
        return {
            "sites": list(self.config.sites),
            "layers": list(self.layers),
            "heads": list(self.config.heads) if self.config.heads is not None else None,
            "kv_heads": list(self.kv_heads) if self.kv_heads is not None else None,
            "positions": list(self.config.positions) if self.config.positions else None,
            "dtype": self.config.dtype,
            "grad": self.config.grad,
            "model": spec_of(self.model),
            "n_layers": int(cfg.n_layers),
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": int(cfg.d_model),
        }

    def estimate(self, prompts: Prompts, *, streamed: bool = False, corrupt: bool = False
                 ) -> budget.Estimate:
        """The bytes a run over ``prompts`` will capture, and the forward's working memory."""
        return self._estimate(*tokenize(self.model, prompts, corrupt=corrupt), streamed=streamed)

    def _estimate(self, tokens: Tensor, lengths: Tensor, *, streamed: bool) -> budget.Estimate:
        cfg = self.model.cfg
        sizes = budget.Sizes(
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_head=int(cfg.d_head),
            d_model=int(cfg.d_model), d_mlp=int(getattr(cfg, "d_mlp", None) or 0),
            d_vocab=int(cfg.d_vocab), n_layers=int(cfg.n_layers))
        bs = self.config.batch_size
        batches = [(int(lengths[s:s + bs].numel()), int(lengths[s:s + bs].max()))
                   for s in range(0, len(lengths), bs)]
        heads = None if self.config.heads is None else len(self.config.heads)
        kv_heads = None if self.kv_heads is None else len(self.kv_heads)
        n_pos = None if self.config.positions is None else len(self.config.positions)
        return budget.estimate(
            sizes, sites=self.config.sites, n_layers=len(self.layers), batches=batches,
            streamed=streamed, itemsize=self._dtype.itemsize, n_pos=n_pos, heads=heads,
            kv_heads=kv_heads, grad=self.config.grad)

    def run(self, prompts: Prompts, *, out_dir: str | Path | None = None, progress: bool = True,
            corrupt: bool = False, metric: Metric | None = None) -> Trace:
        """Trace prompts in batches.

        Args:
            prompts: a string, a list of strings, token ids ``[batch, pos]``, or a
                :class:`~mechscope.tasks.TaskBatch` (its clean rows and lengths).
            out_dir: stream one shard per batch to this new folder (bounded memory); the
                returned trace then holds only the last batch's tensors plus the folder in
                ``meta["path"]`` — reopen the whole with :func:`mechscope.probes.open_trace`.
            progress: show a progress bar on stderr.
            corrupt: trace a TaskBatch's corrupt rows instead of its clean rows.
            metric: for a gradient tracer, ``metric(logits) -> scalar``, applied to each
                batch's logits (so use a sum over rows, or one batch, for grads that do not
                depend on how prompts are batched).

        Raises:
            InputError: bad prompts, a prompt longer than the context, or an estimated size
                over the memory budget (checked before any forward).
        """
        from tqdm.auto import tqdm

        tokens, lengths = tokenize(self.model, prompts, corrupt=corrupt)
        est = self._estimate(tokens, lengths, streamed=out_dir is not None)
        budget.check(est, budget.max_bytes(self.config.max_bytes), longest=int(lengths.max()))
        bs = self.config.batch_size
        starts = range(0, tokens.shape[0], bs)
        bar = tqdm(starts, desc="trace", unit="batch", disable=not progress or len(starts) < 2,
                   leave=False)
        if out_dir is not None:
            last: Trace | None = None
            with TraceWriter(out_dir, meta=self._meta()) as writer:
                for start in bar:
                    sl = slice(start, start + bs)
                    n = int(lengths[sl].max())
                    _, last = self.forward(tokens[sl, :n], lengths[sl], metric=metric)
                    writer.write(last)
            assert last is not None
            return replace(last, meta={**last.meta, "path": str(out_dir)})
        parts = []
        for start in bar:
            sl = slice(start, start + bs)
            n = int(lengths[sl].max())
            parts.append(self.forward(tokens[sl, :n], lengths[sl], metric=metric)[1])
        return concat_traces(parts)


def trace(model: Model, prompts: Prompts, config: TraceConfig | None = None, *,
          out_dir: str | Path | None = None, progress: bool = True, corrupt: bool = False,
          backend: str | Backend = "local", shard_size: int | None = None,
          **fields: Any) -> Trace:
    """One-call tracing: ``with Tracer(model, config) as t: return t.run(prompts)``.

    ``backend="ray"`` (or a :class:`~mechscope.scale.Backend`) traces shards of whole batches
    (``shard_size`` prompts, default 4 batches) on Ray workers and concatenates them in order
    (streamed to ``out_dir`` in order where given): the same trace as the local run, bit for bit.
    """
    sharding = as_backend(backend, shard_size=shard_size)
    if sharding.sharded:
        from mechscope.scale.sweeps import trace_sweep

        config = replace(config, **fields) if config is not None else TraceConfig(**fields)
        if config.grad:
            raise InputError("a sharded trace captures activations only; run trace_with_grad "
                             "locally (gradients depend on how prompts are batched)")  # fmt: skip
        return trace_sweep(model, prompts, config, backend=sharding, out_dir=out_dir,  # type: ignore[no-any-return]
                           progress=progress, corrupt=corrupt)  # fmt: skip
    with Tracer(model, config, **fields) as tracer:
        return tracer.run(prompts, out_dir=out_dir, progress=progress, corrupt=corrupt)


def trace_with_grad(model: Model, prompts: Prompts, metric: Metric,
                    config: TraceConfig | None = None, *, out_dir: str | Path | None = None,
                    progress: bool = True, corrupt: bool = False, **fields: Any) -> Trace:
    """Activations and ``d metric / d activation`` of the chosen sites, from one backward.

    For attribution patching: the returned trace's ``tensors`` hold the activations and its
    ``grads`` the gradients, same keys and shapes (restrictions applied), zeros where the metric
    does not depend on an activation. ``metric(logits) -> scalar`` is applied to each batch's
    logits. ``head_resid`` grads are ``d metric / d attn_out`` for every head (``attn_out`` is the
    sum of the heads' ``head_resid`` plus ``b_O``). Only activations are differentiated, never
    parameters (no ``.grad`` is written).

    >>> import torch
    >>> from mechscope.models import load
    >>> model = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8")
    >>> tr = trace_with_grad(model, torch.tensor([[1, 2, 3]]), lambda logits: logits[0, -1, 4],
    ...                      sites=("resid",), progress=False)
    >>> tr.grads["resid.0"].shape == tr.resid(0).shape
    True
    """
    config = replace(config or TraceConfig(), **fields, grad=True)
    with Tracer(model, config) as tracer:
        return tracer.run(prompts, out_dir=out_dir, progress=progress, corrupt=corrupt,
                          metric=metric)
