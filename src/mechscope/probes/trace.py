"""What a tracer captured: :class:`Trace`, in memory or on disk.

On disk a trace is a folder of safetensors shards (one per batch) and an ``index.json`` that is
written last; the folder is assembled under a temporary name and renamed into place, so a
crashed run leaves no folder that looks complete. :func:`open_trace` reads it back whole;
:func:`iter_shards` reads one shard at a time, so memory stays bounded for big traces.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope._fs import apply_umask
from mechscope.errors import HookNameError, StoreError
from mechscope.probes.sites import SITE_SPECS, key_for, split_key

INDEX = "index.json"
FORMAT = "mechscope-trace/1"
_GRAD = "__grad__."
_RESERVED = ("tokens", "lengths", "top_tokens", "top_logprobs", "positions")


@dataclass(frozen=True, eq=False)
class Trace:
    """Captured activations of a batch of prompts.

    Attributes:
        tensors: ``"<site>.<layer>" -> tensor`` with batch first (shapes in
            :mod:`mechscope.probes.sites`; with ``positions`` set, the position axis (the query
            axis of patterns) holds only the captured positions; with ``heads`` set, the head
            axis holds only those heads, in that order).
        tokens: the token ids, right-padded.
        lengths: the real length of each row.
        top_tokens: the model's top next-token predictions at each row's last real position.
        top_logprobs: their log-probabilities.
        positions: the absolute positions captured per row, or None for all positions.
        meta: sites, layers, heads, dtype, model spec and shape.
        grads: for a gradient trace (:func:`mechscope.probes.trace_with_grad`), ``d metric /
            d activation`` under the same keys and with the same shapes as ``tensors``; zeros
            where the metric does not depend on the activation. Empty otherwise.
    """

    tensors: Mapping[str, Tensor]
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    top_tokens: Int[Tensor, "batch k"]
    top_logprobs: Float[Tensor, "batch k"]
    positions: Int[Tensor, "batch n_pos"] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    grads: Mapping[str, Tensor] = field(default_factory=dict)

    # -- typed accessors ---------------------------------------------------------------------
    def get(self, site: str, layer: int) -> Tensor:
        """The tensor of ``site`` at ``layer``; a clear error if it was not captured."""
        key = key_for(site, layer)
        if key not in self.tensors:
            have = ", ".join(sorted(self.tensors)) or "nothing"
            raise HookNameError(
                f"this trace has no {site!r} at layer {layer} (it holds {have}); "
                f"trace again with sites including {site!r} and that layer"
            )
        return self.tensors[key]

    def heads(self, layer: int) -> Float[Tensor, "batch pos head d_head"]:
        """Per-head outputs before W_O (``hook_z``)."""
        return self.get("heads", layer)

    def head_resid(self, layer: int) -> Float[Tensor, "batch pos head d_model"]:
        """Per-head contributions to the residual stream, ``z @ W_O`` (no bias)."""
        return self.get("head_resid", layer)

    def pattern(self, layer: int) -> Float[Tensor, "batch head query key"]:
        """Attention patterns."""
        return self.get("patterns", layer)

    def attn_scores(self, layer: int) -> Float[Tensor, "batch head query key"]:
        """Pre-softmax, masked attention scores (``hook_attn_scores``)."""
        return self.get("attn_scores", layer)

    def q(self, layer: int) -> Float[Tensor, "batch pos head d_head"]:
        """Queries (``hook_q``; before rotary embeddings)."""
        return self.get("q", layer)

    def k(self, layer: int) -> Float[Tensor, "batch pos kv_head d_head"]:
        """Keys (``hook_k``; ``n_key_value_heads`` heads, before rotary embeddings)."""
        return self.get("k", layer)

    def v(self, layer: int) -> Float[Tensor, "batch pos kv_head d_head"]:
        """Values (``hook_v``; ``n_key_value_heads`` heads)."""
        return self.get("v", layer)

    def grad(self, site: str, layer: int) -> Tensor:
        """``d metric / d activation`` of ``site`` at ``layer`` (a gradient trace only)."""
        self.get(site, layer)
        if not self.grads:
            raise HookNameError(
                "this trace holds no gradients; trace with mechscope.probes.trace_with_grad"
            )
        return self.grads[key_for(site, layer)]

    def ffn(self, layer: int) -> Float[Tensor, "batch pos d_mlp"]:
        """FFN activations after the nonlinearity (``mlp.hook_post``)."""
        return self.get("ffn", layer)

    def ffn_pre(self, layer: int) -> Float[Tensor, "batch pos d_mlp"]:
        """FFN pre-activations (``mlp.hook_pre``)."""
        return self.get("ffn_pre", layer)

    def resid(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after block ``layer`` (``hook_resid_post``)."""
        return self.get("resid", layer)

    def resid_pre(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        return self.get("resid_pre", layer)

    def attn_out(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        return self.get("attn_out", layer)

    def mlp_out(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        return self.get("mlp_out", layer)

    def stack(self, site: str) -> Tensor:
        """Every captured layer of ``site`` stacked on a new leading ``layer`` axis."""
        layers = self.layers(site)
        if not layers:
            raise HookNameError(f"this trace has no {site!r}; captured: {sorted(self.tensors)}")
        return torch.stack([self.get(site, layer) for layer in layers])

    def layers(self, site: str) -> list[int]:
        """The layers at which ``site`` was captured."""
        return sorted(layer for s, layer in map(split_key, self.tensors) if s == site)

    @property
    def sites(self) -> list[str]:
        return sorted({split_key(k)[0] for k in self.tensors})

    @property
    def n_prompts(self) -> int:
        return int(self.tokens.shape[0])

    def shapes(self) -> dict[str, list[int]]:
        """``key -> shape`` of every captured tensor."""
        return {k: list(v.shape) for k, v in sorted(self.tensors.items(), key=_key_order)}

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write this trace as a one-shard folder; see :func:`open_trace`."""
        with TraceWriter(directory, meta=dict(self.meta)) as writer:
            writer.write(self)
        return Path(directory)


def _key_order(item: tuple[str, Any]) -> tuple[str, int]:
    return split_key(item[0])


def _pad_to(t: Tensor, axes: tuple[int, ...], size: int) -> Tensor:
    for axis in axes:
        if t.shape[axis] < size:
            pad_shape = list(t.shape)
            pad_shape[axis] = size - t.shape[axis]
            t = torch.cat([t, t.new_zeros(pad_shape)], dim=axis)
    return t


def concat_traces(parts: list[Trace]) -> Trace:
    """Concatenate traces along ``batch``, right-padding position axes to the longest."""
    if not parts:
        raise StoreError("no trace to concatenate")
    if len(parts) == 1:
        return parts[0]
    max_pos = max(p.tokens.shape[1] for p in parts)
    restricted = parts[0].positions is not None

    def join(mappings: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key in mappings[0]:
            spec = SITE_SPECS[split_key(key)[0]]
            # Key axes always span the sequence; query/pos axes only when unrestricted.
            axes = spec.key_axes if restricted else (*spec.pos_axes, *spec.key_axes)
            out[key] = torch.cat([_pad_to(m[key], axes, max_pos) for m in mappings])
        return out

    tensors = join([p.tensors for p in parts])
    grads = join([p.grads for p in parts]) if parts[0].grads else {}
    return Trace(
        tensors=tensors,
        tokens=torch.cat([_pad_to(p.tokens, (1,), max_pos) for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        top_tokens=torch.cat([p.top_tokens for p in parts]),
        top_logprobs=torch.cat([p.top_logprobs for p in parts]),
        positions=torch.cat([p.positions for p in parts]) if restricted else None,  # type: ignore[misc]
        meta=parts[0].meta,
        grads=grads,
    )


class TraceWriter:
    """Streams trace shards into a folder that appears only when complete.

    >>> import tempfile, torch
    >>> t = Trace(tensors={"resid.0": torch.zeros(2, 3, 4)}, tokens=torch.zeros(2, 3, dtype=torch.long),
    ...           lengths=torch.tensor([3, 3]), top_tokens=torch.zeros(2, 1, dtype=torch.long),
    ...           top_logprobs=torch.zeros(2, 1))
    >>> d = tempfile.mkdtemp() + "/trace"
    >>> with TraceWriter(d) as w:
    ...     w.write(t); w.write(t)
    >>> open_trace(d).resid(0).shape
    torch.Size([4, 3, 4])
    """

    def __init__(self, directory: str | Path, *, meta: dict[str, Any] | None = None,
                 overwrite: bool = False) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not overwrite:
            raise StoreError(f"{self.directory} exists; choose a new folder or pass overwrite=True")
        self.meta = dict(meta or {})
        self.shards: list[dict[str, Any]] = []
        self._tmp: Path | None = None

    def __enter__(self) -> TraceWriter:
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.tmp-",
                                              dir=self.directory.parent))
        except OSError as exc:
            raise StoreError(f"cannot write a trace to {self.directory}: {exc.strerror or exc}; "
                             "choose a folder you can write to") from None
        return self

    def write(self, trace: Trace) -> None:
        """Write one batch as a shard."""
        from safetensors.torch import save_file

        assert self._tmp is not None, "use TraceWriter as a context manager"
        name = f"shard-{len(self.shards):05d}.safetensors"
        payload = {k: v.contiguous() for k, v in trace.tensors.items()}
        payload.update({_GRAD + k: v.contiguous() for k, v in trace.grads.items()})
        for attr in _RESERVED:
            value = getattr(trace, attr)
            if value is not None:
                payload[f"__{attr}__"] = value.contiguous()
        save_file(payload, str(self._tmp / name))
        self.shards.append({"file": name, "n_prompts": trace.n_prompts,
                            "pos": int(trace.tokens.shape[1])})
        if not self.meta:
            self.meta = dict(trace.meta)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._tmp is not None
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        index = {"format": FORMAT, "meta": self.meta, "shards": self.shards,
                 "n_prompts": sum(s["n_prompts"] for s in self.shards)}
        (self._tmp / INDEX).write_text(json.dumps(index, indent=1, default=str))
        apply_umask(self._tmp)  # mkdtemp (0700) and safetensors (0600) are owner-only
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.replace(self._tmp, self.directory)


def _read_index(directory: Path) -> dict[str, Any]:
    index = directory / INDEX
    if not index.is_file():
        raise StoreError(f"{directory} is not a complete trace (no {INDEX}); it may have crashed")
    data = json.loads(index.read_text())
    if data.get("format") != FORMAT:
        raise StoreError(f"{directory} has trace format {data.get('format')!r}, expected {FORMAT}")
    return data


def iter_shards(directory: str | Path) -> Iterator[Trace]:
    """Yield a trace folder's shards one at a time (bounded memory)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = _read_index(directory)
    for shard in index["shards"]:
        payload = load_file(str(directory / shard["file"]))
        extra = {a: payload.pop(f"__{a}__", None) for a in _RESERVED}
        grads = {k[len(_GRAD):]: payload.pop(k) for k in list(payload) if k.startswith(_GRAD)}
        yield Trace(tensors=payload, meta=index["meta"], grads=grads, **extra)  # type: ignore[arg-type]


def open_trace(directory: str | Path) -> Trace:
    """Read a whole trace folder back into memory."""
    return concat_traces(list(iter_shards(directory)))
