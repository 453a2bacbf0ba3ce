"""How the head analyses read attention: materialised patterns, or the statistics path.

The bridge runs eager attention, and a pattern capture holds ``[batch, head, query, key]`` per
layer: on SmolLM2 at 8,192 tokens that is 2.4 GB a layer and 72 GB for all 30, and the eager
forward itself holds about 5 GB a layer while it runs. The head analyses need only statistics of
attention (what each key receives, where chosen queries look, the mass on a segment), so for long
inputs they take the **statistics path**:

- the forward runs layer by layer over the bridge's own modules (the patching
  :class:`~mechscope.attribution.engine.Engine`'s norms, projections, rotary and MLPs), with
  torch's ``scaled_dot_product_attention`` (causal, grouped-query) in place of eager attention:
  no ``[query, key]`` tensor is ever materialised, and one prompt runs at a time at its own
  length (no padding);
- each layer's rotated queries and keys go to :func:`mechscope.kernels.attention_stats` (an
  online-softmax pass over key blocks: the Triton kernel on a GPU, the chunked torch reference
  on a CPU) and are dropped before the next layer, so only one layer's q/k is ever held.

:func:`choose_path` takes the statistics path when one prompt's patterns (every layer) plus the
eager forward's working memory would exceed the memory budget (``$MECHSCOPE_MAX_BYTES``, else
4 GiB; :mod:`mechscope.probes.budget`), and says why. The path can also be forced
(``path="patterns" | "stats"``). Both paths give the same statistics up to fp32 rounding: the
pattern path reads them from the captured pattern (:func:`mechscope.kernels.stats_from_pattern`).

The statistics path runs what the engine runs (:meth:`Engine.why_not`: native models, and
Hugging Face Llama, Mistral and Qwen2 decoders with standard rotary positions). Any other
positional scheme or attention variant (ALiBi, soft-capping, sliding windows, query/key norms,
encoders) is refused by name; those models keep the pattern path, within the budget.

>>> from mechscope.models import load
>>> m = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=64")
>>> choose_path(m, [40]).path
'patterns'
>>> choose_path(m, [40], max_bytes=1000).path
'stats'
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.kernels import AttnStats, attention_stats, stats_from_pattern
from mechscope.probes import budget
from mechscope.types import Model

if TYPE_CHECKING:
    from mechscope.attribution.engine import Engine

__all__ = ["PATHS", "LayerStats", "PathChoice", "StatsForward", "choose_path", "layer_stats",
           "pattern_bytes", "why_no_stats"]  # fmt: skip

PATHS = ("auto", "patterns", "stats")


@dataclass(frozen=True)
class PathChoice:
    """The path an analysis takes (``"patterns"`` or ``"stats"``) and why, in words."""

    path: str
    why: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "why": self.why}


def pattern_bytes(model: Model, length: int, rows: int = 1) -> int:
    """Bytes the pattern path holds for ``rows`` prompts of ``length`` tokens: the patterns of
    every layer (fp32) plus the eager forward's scores and pattern of one layer."""
    c = model.cfg
    per_layer = rows * int(c.n_heads) * length * length * 4
    return per_layer * (int(c.n_layers) + 2)


def why_no_stats(model: Model) -> str | None:
    """None when the statistics path can run ``model``; else why not (in words)."""
    from mechscope.attribution.engine import Engine

    why = Engine.why_not(model)
    if why is not None:
        return f"the statistics path does not know this model's attention: {why}"
    c = model.cfg
    for name in ("sliding_window", "window_size"):
        w = getattr(c, name, None)
        if isinstance(w, int) and 0 < w < int(c.n_ctx):
            return f"the statistics path does not implement sliding-window attention ({name}={w})"
    pos = str(getattr(c, "positional_embedding_type", "standard") or "standard")
    if pos not in ("standard", "rotary"):
        return (f"the statistics path does not know the positional scheme {pos!r} (it knows "
                "absolute and standard rotary positions)")  # fmt: skip
    return None


def choose_path(model: Model, lengths: Sequence[int] | Tensor, path: str = "auto", *,
                max_bytes: int | None = None) -> PathChoice:
    """Which path reads attention for prompts of ``lengths`` tokens.

    ``path="auto"``: patterns while the longest prompt's patterns (:func:`pattern_bytes`) fit the
    budget (``max_bytes``; None: ``$MECHSCOPE_MAX_BYTES``, else 4 GiB), else the statistics
    path. ``"patterns"`` / ``"stats"`` force one.

    Raises:
        InputError: an unknown ``path``; ``"stats"`` forced (or needed) on a model the statistics
            path cannot run (the message says why, and the budget to raise).
    """
    if path not in PATHS:
        raise InputError(f"unknown attention path {path!r}; choose from {', '.join(PATHS)}")
    limit = budget.max_bytes(max_bytes)
    longest = int(max((int(x) for x in lengths), default=0))
    need = pattern_bytes(model, longest)
    sizes = (f"patterns of {int(model.cfg.n_layers)} layers x {int(model.cfg.n_heads)} heads x "
             f"{longest}² keys = {budget.human(need)}")  # fmt: skip
    no_stats = why_no_stats(model)
    if path == "patterns":
        return PathChoice("patterns", f"path='patterns' ({sizes})")
    if path == "stats":
        if no_stats is not None:
            raise InputError(f"path='stats': {no_stats}; use path='patterns' (or 'auto')")
        return PathChoice("stats", f"path='stats' ({sizes} not materialised)")
    if need <= limit:
        return PathChoice("patterns", f"{sizes} fit the memory budget of {budget.human(limit)}")
    if no_stats is not None:
        raise InputError(
            f"{sizes} exceed the memory budget of {budget.human(limit)}, and {no_stats}. Shorten the "
            f"prompts, or raise the budget ({budget.ENV_VAR}=64G) if the machine has the memory")
    return PathChoice("stats", f"{sizes} exceed the memory budget of {budget.human(limit)} "
                               f"({budget.ENV_VAR}): attention statistics without patterns")  # fmt: skip


# -- the statistics path's forward ---------------------------------------------------------------


class Forward(NamedTuple):
    """What :meth:`StatsForward.run` returns besides the per-layer statistics.

    ``resid``: the final residual (before the final norm) ``[pos, d_model]``; ``k``/``v``: the
    key/value cache ``[layer, 1, pos, kv_head, d_head]`` when asked for (the engine's
    :class:`~mechscope.attribution.engine.RunCache` layout); ``last_pattern``: the last query's
    attention ``[layer, 1, head, key]`` when asked for.
    """

    resid: Tensor
    k: Tensor | None
    v: Tensor | None
    last_pattern: Tensor | None


class StatsForward:
    """The model's forward, layer by layer, with memory-efficient attention (module docstring).

    >>> from mechscope.models import load
    >>> m = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=64")
    >>> fwd = StatsForward(m)
    >>> seen = []
    >>> out = fwd.run(torch.tensor([1, 2, 3, 4]), on_layer=lambda ly, st, x: seen.append(ly))
    >>> seen, tuple(out.resid.shape)
    ([0, 1], (4, 16))
    """

    def __init__(self, model: Model, engine: Engine | None = None) -> None:
        """``engine``: the model's :class:`~mechscope.attribution.engine.Engine` when the caller
        has built it already (else it is built here)."""
        from mechscope.attribution.engine import Engine

        why = why_no_stats(model)
        eng = (engine or Engine.of(model)) if why is None else None
        if eng is None or eng._embed is None:
            raise InputError(f"{why or 'the engine cannot embed tokens for this model'}; use the "
                             "pattern path (path='patterns')")  # fmt: skip
        self.model, self.engine = model, eng

    def run(self, tokens: Tensor, *, on_layer: Callable[[int, AttnStats | None, Tensor], None] | None = None,
            **kw: Any) -> Forward:  # fmt: skip
        """Run one prompt ``tokens [pos]`` (no padding); ``on_layer(layer, stats, resid_pre)`` is
        called at each layer (see :meth:`steps`, which takes the same keywords)."""
        steps = self.steps(tokens, **kw)
        while True:
            try:
                layer, st, x = next(steps)
            except StopIteration as done:
                out: Forward = done.value
                return out
            if on_layer is not None:
                on_layer(layer, st, x)

    def steps(self, tokens: Tensor, *, stats: bool = True, queries: Sequence[int] | None = None,
              top_k: int = 1, segments: Sequence[tuple[int, int]] | None = None,
              keep_cache: bool = False, last_pattern: bool = False,
              cache_out: tuple[Tensor, Tensor] | None = None
              ) -> Generator[tuple[int, AttnStats | None, Tensor], None, Forward]:  # fmt: skip
        """Run one prompt ``tokens [pos]`` (no padding), yielding at each layer ``(layer, stats,
        resid_pre)``: that layer's :class:`~mechscope.kernels.AttnStats` (None with
        ``stats=False``) and its block input ``[1, pos, d_model]``. Nothing of a layer is kept
        after the next one starts unless asked (``keep_cache``: keys and values;
        ``last_pattern``: the last query's attention row; ``cache_out``: ``(k, v)`` buffers
        ``[layer, pos, kv_head, d_head]`` the keys and values are written into, e.g. one row of
        a batch's cache). Returns (as the generator's value) the :class:`Forward`.
        """
        eng = self.engine
        ids = torch.as_tensor(tokens).reshape(-1).long()
        n = int(ids.shape[0])
        if n == 0:
            raise InputError("the prompt is empty; give it at least one token")
        n_ctx = int(self.model.cfg.n_ctx)
        if n > n_ctx:
            raise InputError(f"the prompt has {n} tokens, more than the model's context of {n_ctx}; "
                             "shorten it")  # fmt: skip
        device = eng.head.weight.device
        pos = torch.arange(n, device=device)
        H, kvh, dh = eng.n_heads, eng.n_kv, eng.d_head
        if keep_cache and cache_out is None:
            shape = (len(eng.layers), n, kvh, dh)
            cache_out = (torch.empty(shape, dtype=eng.dtype, device=device),
                         torch.empty(shape, dtype=eng.dtype, device=device))  # fmt: skip
        rows: list[Tensor] = []
        with torch.no_grad():
            x = eng.embed(ids[None].to(device), pos[None])[0]  # [pos, d_model]
        for layer, ly in enumerate(eng.layers):
            with torch.no_grad():
                h = ly.ln1(x)
                q, k, v = ly.q(h).view(n, H, dh), ly.k(h).view(n, kvh, dh), ly.v(h).view(n, kvh, dh)
                if ly.rope is not None:
                    q, k = ly.rope(q, k, pos)
                qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, pos, d]
                st = None
                if stats:
                    st = attention_stats(qb, kb, scale=ly.scale, queries=queries, top_k=top_k,
                                         segments=segments)  # fmt: skip
            yield layer, st, x[None]
            with torch.no_grad():
                z = torch.nn.functional.scaled_dot_product_attention(
                    qb, kb, vb, is_causal=True, scale=ly.scale, enable_gqa=kvh != H)
                if last_pattern:
                    kr = kb.repeat_interleave(H // kvh, dim=1) if kvh != H else kb
                    s = torch.einsum("bhd,bhkd->bhk", qb[:, :, -1].float(), kr.float()) * ly.scale
                    rows.append(torch.softmax(s, dim=-1).to(q.dtype))
                if cache_out is not None:
                    cache_out[0][layer] = k
                    cache_out[1][layer] = v
                del q, k, qb, kb
                a = ly.o(z[0].transpose(0, 1).reshape(n, H * dh))
                mid = x + a
                x = mid if ly.mlp is None or ly.ln2 is None else mid + ly.mlp(ly.ln2(mid))
        return Forward(resid=x, k=cache_out[0][:, None] if cache_out is not None else None,
                       v=cache_out[1][:, None] if cache_out is not None else None,
                       last_pattern=torch.stack(rows) if last_pattern else None)  # fmt: skip

    def prefill(self, tokens: Tensor) -> tuple[Any, Tensor, Tensor]:
        """:meth:`Engine.prefill <mechscope.attribution.engine.Engine.prefill>` without the
        ``[query, key]`` tensors, for decoding from a long prompt: ``tokens [row, pos]`` (equal
        lengths, no padding) run one row at a time. Returns the key/value cache
        (:class:`~mechscope.attribution.engine.RunCache`), the final residual of each row's
        *last* position ``[row, 1, d_model]``, and the last query's attention ``[layer, row,
        head, key]``."""
        from mechscope.attribution.engine import RunCache

        eng = self.engine
        shape = (len(eng.layers), len(tokens), tokens.shape[1], eng.n_kv, eng.d_head)
        dev = eng.head.weight.device
        k, v = torch.empty(shape, dtype=eng.dtype, device=dev), torch.empty(shape, dtype=eng.dtype, device=dev)
        outs = [self.run(row, stats=False, last_pattern=True, cache_out=(k[:, r], v[:, r]))
                for r, row in enumerate(tokens)]  # the keys and values written in place
        pat = torch.cat([o.last_pattern for o in outs if o.last_pattern is not None], dim=1)
        return RunCache(acts={}, k=k, v=v), torch.stack([o.resid[-1:] for o in outs]), pat

    def logits(self, tokens: Tensor) -> Tensor:
        """Logits ``[pos, vocab]`` of one prompt by this forward (no statistics): what the
        tests compare with the bridge's eager forward."""
        out = self.run(tokens, stats=False)
        return self.engine.logits(out.resid)


# -- one iterator over both paths ------------------------------------------------------------------


class LayerStats(NamedTuple):
    """One layer's attention statistics for a group of prompts.

    ``rows``: the prompts' indices in the input; ``lengths``: their real lengths; ``stats``: the
    :class:`~mechscope.kernels.AttnStats` of ``[len(rows), head, ...]`` over ``max(lengths)``
    positions; ``resid_pre``: the layer's block input ``[len(rows), pos, d_model]`` when asked
    for; ``causal``: whether the attention is causal (the pattern path reads it from the pattern).
    """

    layer: int
    rows: Tensor
    lengths: Tensor
    stats: AttnStats
    resid_pre: Tensor | None
    causal: bool


def layer_stats(model: Model, tokens: Tensor, lengths: Tensor, choice: PathChoice, *,
                queries: Sequence[int] | None = None, top_k: int = 1,
                segments: Sequence[tuple[int, int]] | None = None, resid: bool = False,
                batch_size: int | None = None, progress: bool = False, desc: str = "attention"
                ) -> Iterator[LayerStats]:  # fmt: skip
    """Attention statistics of every layer over right-padded ``tokens [prompt, pos]`` by the
    chosen path: groups of ``batch_size`` prompts through a pattern trace (None: as many as keep
    every layer's patterns within 512 MiB, at most 16), or one prompt at a time through
    :class:`StatsForward` (only one layer's statistics alive at a time)."""
    from mechscope.circuits.sinks import is_causal
    from mechscope.probes import Tracer

    n_rows, n_layers = int(tokens.shape[0]), int(model.cfg.n_layers)
    kw: dict[str, Any] = {"queries": queries, "top_k": top_k, "segments": segments}
    if choice.path == "stats":
        fwd = StatsForward(model)
        bar = tqdm(total=n_rows * n_layers, desc=f"{desc} (stats path)", unit="layer",
                   disable=not progress, leave=False)  # fmt: skip
        for r in range(n_rows):
            m = int(lengths[r])
            for layer, st, x in fwd.steps(tokens[r, :m], **kw):
                assert st is not None
                yield LayerStats(layer, torch.tensor([r]), torch.tensor([m]), st,
                                 x if resid else None, True)  # fmt: skip
                bar.update(1)
        bar.close()
        return
    sites = ("patterns", "resid_pre") if resid else ("patterns",)
    if batch_size is None:
        per = pattern_bytes(model, int(tokens.shape[1])) // (n_layers + 2) * n_layers
        batch_size = max(1, min(16, (512 << 20) // max(per, 1)))
    starts = range(0, n_rows, batch_size)
    causal: bool | None = None  # read once, from the first pattern (a model's mask is fixed)
    with Tracer(model, sites=sites) as tracer:
        for s in tqdm(starts, desc=f"{desc} (pattern path)", unit="batch", disable=not progress,
                      leave=False):  # fmt: skip
            lens = lengths[s : s + batch_size]
            n = int(lens.max())
            _, tr = tracer.forward(tokens[s : s + batch_size, :n], lens)
            for layer in range(n_layers):
                pat = tr.pattern(layer).float()
                causal = is_causal(pat) if causal is None else causal
                st = stats_from_pattern(pat, lengths=lens, **kw)
                yield LayerStats(layer, torch.arange(s, s + len(lens)), lens, st,
                                 tr.resid_pre(layer) if resid else None, causal)  # fmt: skip
