"""The tracer: capture per-head outputs, attention patterns, FFN activations and the residual stream.

A :class:`Tracer` is a context manager over one model. Inside the ``with`` block its hooks are
attached (through :func:`mechscope.probes.hooks.hooked`, the one place hooks are registered);
on exit they are removed, also when a forward raises. ``run`` batches prompts, right-pads them
with an attention mask, and returns a :class:`~mechscope.probes.trace.Trace` in memory, or
streams one safetensors shard per batch to a folder so memory does not grow with the number of
prompts.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import HookNameError, InputError
from mechscope.probes.hooks import hooked
from mechscope.probes.sites import SITE_SPECS, hook_for, key_for, parse_sites
from mechscope.probes.trace import Trace, TraceWriter, concat_traces

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """What to capture.

    Attributes:
        sites: site names (see :mod:`mechscope.probes.sites`).
        layers: layers to capture; None for all.
        heads: heads to keep on head-indexed sites (``heads``, ``head_resid``, ``patterns``);
            None for all.
        positions: positions to keep (negative counts from each row's last real token, so
            ``(-1,)`` is the last token of every prompt); None for all.
        dtype: dtype of the stored tensors.
        batch_size: prompts per forward.
        top_k: how many top next-token predictions to keep per prompt.
    """

    sites: tuple[str, ...] = ("heads",)
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    dtype: str = "float32"
    batch_size: int = 8
    top_k: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", parse_sites(self.sites))
        if self.dtype not in _DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; choose from {', '.join(_DTYPES)}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.positions is not None and not self.positions:
            raise InputError("positions=() captures nothing; pass None for all positions")


# Token ids are an integer [batch, pos] tensor; any other tensor gets a clear InputError.
Prompts = str | Sequence[str] | Tensor | Sequence[Sequence[int]]


def tokenize(model: Any, prompts: Prompts, *, pad_id: int | None = None
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Turn prompts into right-padded token ids and real lengths, checking the input.

    Strings are tokenized one by one with the model's tokenizer (``to_tokens``, which adds BOS
    where the model expects it); token tensors are used as they are (all rows full length).
    """
    n_ctx = int(model.cfg.n_ctx)
    if isinstance(prompts, Tensor):
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2 or prompts.shape[1] == 0 or prompts.shape[0] == 0:
            raise InputError(f"token ids must be a non-empty [batch, pos] tensor, got {tuple(prompts.shape)}")
        if prompts.dtype.is_floating_point:
            raise InputError("token ids must be integers, got a floating-point tensor")
        rows: list[Tensor] = list(prompts.long())
    else:
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        if not items:
            raise InputError("no prompt given; pass at least one non-empty prompt")
        rows = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item.strip():
                    raise InputError(f"prompt {i} is empty; give it some text")
                if model.tokenizer is None:
                    raise InputError(
                        "this model has no tokenizer (a native/zoo model); pass token ids instead of text"
                    )
                rows.append(model.to_tokens(item)[0].long().cpu())
            else:
                ids = torch.as_tensor(list(item), dtype=torch.long)
                if ids.numel() == 0:
                    raise InputError(f"prompt {i} has no tokens")
                rows.append(ids)
    vocab = int(model.cfg.d_vocab)
    for i, row in enumerate(rows):
        if row.numel() > n_ctx:
            raise InputError(
                f"prompt {i} has {row.numel()} tokens but the model's context is {n_ctx}; "
                "shorten it or split it into windows"
            )
        if int(row.min()) < 0 or int(row.max()) >= vocab:
            raise InputError(f"prompt {i} has token ids outside [0, {vocab}); check the tokenizer")
    lengths = torch.tensor([r.numel() for r in rows])
    if pad_id is None:
        tok = getattr(model, "tokenizer", None)
        pad_id = int(getattr(tok, "pad_token_id", None) or 0) if tok is not None else 0
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : row.numel()] = row
    return tokens, lengths


class Tracer:
    """Capture sites of one model inside a ``with`` block.

    Args:
        model: a ``TransformerBridge``.
        config: a :class:`TraceConfig`; or give its fields as keyword arguments.
    """

    def __init__(self, model: Any, config: TraceConfig | None = None, **fields: Any) -> None:
        config = config or TraceConfig()
        if fields:
            config = replace(config, **fields)
        self.model = model
        self.config = config
        n_layers = int(model.cfg.n_layers)
        layers = config.layers if config.layers is not None else tuple(range(n_layers))
        bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
        if bad:
            raise HookNameError(f"layers {bad} out of range; the model has {n_layers} layers (0..{n_layers - 1})")
        self.layers = tuple(sorted({layer % n_layers for layer in layers}))
        n_heads = int(model.cfg.n_heads)
        if config.heads is not None:
            bad = [h for h in config.heads if not 0 <= h < n_heads]
            if bad:
                raise HookNameError(f"heads {bad} out of range; the model has {n_heads} heads per layer")
        if getattr(model.cfg, "attn_only", False):
            mlp_sites = [s for s in config.sites if SITE_SPECS[s].needs_mlp]
            if mlp_sites:
                raise HookNameError(f"sites {mlp_sites} need MLPs, but this model is attention-only")
        self._dtype = _DTYPES[config.dtype]
        self._buffer: dict[str, Tensor] = {}
        self._positions: Tensor | None = None
        self._stack: contextlib.ExitStack | None = None
        self._w_o: dict[int, Tensor] = {}

    # -- hooks -------------------------------------------------------------------------------
    def _hook_table(self) -> list[tuple[str, Callable[..., None]]]:
        by_hook: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for layer in self.layers:
            for site in self.config.sites:
                by_hook[hook_for(site, layer)].append((site, layer))
        return [(name, self._make_hook(targets)) for name, targets in by_hook.items()]

    def _select(self, site: str, act: Tensor) -> Tensor:
        spec = SITE_SPECS[site]
        if self.config.heads is not None and spec.head_axis is not None:
            idx = torch.tensor(self.config.heads, device=act.device)
            act = act.index_select(spec.head_axis, idx)
        if self._positions is not None:
            axis = spec.pos_axes[0]
            pos = self._positions.to(act.device)  # [batch, n_pos]
            moved = act.movedim(axis, 1)  # [batch, pos, ...]
            index = pos.view(*pos.shape, *([1] * (moved.ndim - 2))).expand(
                -1, -1, *moved.shape[2:])
            act = moved.gather(1, index).movedim(1, axis)
        return act

    def _make_hook(self, targets: list[tuple[str, int]]) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            for site, layer in targets:
                sel = self._select(site, act.detach())
                if site == "head_resid":
                    sel = torch.einsum("bphd,hdm->bphm", sel, self._w_o_for(layer).to(sel.dtype))
                self._buffer[key_for(site, layer)] = sel.to(self._dtype, copy=True)

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
        stack.enter_context(hooked(self.model, self._hook_table()))
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self._buffer = {}
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

    def forward(self, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"] | None = None
                ) -> tuple[Float[Tensor, "batch pos vocab"], Trace]:
        """One forward on a padded batch; returns the logits and what was captured."""
        if self._stack is None:
            raise RuntimeError("use the Tracer as a context manager: `with Tracer(model) as t:`")
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1])
        self._positions = self._resolve_positions(lengths)
        self._buffer = {}
        device = getattr(self.model.cfg, "device", None) or "cpu"
        kwargs: dict[str, Any] = {}
        if bool((lengths < tokens.shape[1]).any()):
            mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
            kwargs["attention_mask"] = mask.long().to(device)
        with torch.no_grad():
            logits = self.model(tokens.to(device), **kwargs)
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
        )
        self._buffer = {}
        return logits, trace

    def _meta(self) -> dict[str, Any]:
        from mechscope.models.loading import spec_of

        cfg = self.model.cfg
        return {
            "sites": list(self.config.sites),
            "layers": list(self.layers),
            "heads": list(self.config.heads) if self.config.heads is not None else None,
            "positions": list(self.config.positions) if self.config.positions else None,
            "dtype": self.config.dtype,
            "model": spec_of(self.model),
            "n_layers": int(cfg.n_layers),
            "n_heads": int(cfg.n_heads),
            "d_model": int(cfg.d_model),
        }

    def run(self, prompts: Prompts, *, out_dir: str | Path | None = None,
            progress: bool = True) -> Trace:
        """Trace prompts in batches.

        Args:
            prompts: a string, a list of strings, or token ids ``[batch, pos]``.
            out_dir: stream one shard per batch to this new folder (bounded memory); the
                returned trace then holds only the last batch's tensors plus the folder in
                ``meta["path"]`` — reopen the whole with :func:`mechscope.probes.open_trace`.
            progress: show a progress bar on stderr.
        """
        from tqdm.auto import tqdm

        tokens, lengths = tokenize(self.model, prompts)
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
                    _, last = self.forward(tokens[sl, :n], lengths[sl])
                    writer.write(last)
            assert last is not None
            return replace(last, meta={**last.meta, "path": str(out_dir)})
        parts = []
        for start in bar:
            sl = slice(start, start + bs)
            n = int(lengths[sl].max())
            parts.append(self.forward(tokens[sl, :n], lengths[sl])[1])
        return concat_traces(parts)


def trace(model: Any, prompts: Prompts, config: TraceConfig | None = None, *,
          out_dir: str | Path | None = None, progress: bool = True, **fields: Any) -> Trace:
    """One-call tracing: ``with Tracer(model, config) as t: return t.run(prompts)``."""
    with Tracer(model, config, **fields) as tracer:
        return tracer.run(prompts, out_dir=out_dir, progress=progress)
