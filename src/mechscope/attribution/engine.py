"""A forward of our own over the bridge's weights, for patching sweeps: layer skipping, prefix
key/value reuse, and logits only where the metric reads them.

Why. A patch at ``(layer l, position p)`` of a causal model leaves every activation of layers
below ``l`` and of positions before ``p`` equal to the unpatched (target) run's. A sweep over
``L x T`` patches therefore needs, per patch, only layers ``l..L-1`` at positions ``p..T-1``,
with the target run's keys and values for the positions before ``p`` (PERFORMANCE.md, "the
floor": about 3.5-3.9x fewer FLOPs than one full forward per patch). TransformerLens 4.3's bridge
cannot do this: ``forward(start_at_layer=l)`` still runs blocks ``0..l-1``, and its
``past_key_values`` path is not exact (logits off by up to 7.6 on SmolLM2). So this module runs
the blocks itself, calling the wrapped modules of the bridge (``block._original_component``: the
norms, the q/k/v/o projections, the MLP, the final norm and the unembedding) and doing the
attention (rotary, grouped-query, causal mask) on its own.

Layout. The tokens still to compute are *packed*: row ``r`` (a patched variant of target row
``target_rows[r]``) contributes its positions ``start[r] .. T-1``, all rows concatenated into one
``[n_tokens, d_model]`` tensor, so the projections and MLPs (nearly all the FLOPs) see exactly
the needed tokens and no padding. Only the attention scores are padded (``[rows, heads,
max_suffix, T]``, cheap at these lengths); the keys and values of positions before ``start[r]``
come from the target run's cache.

Stages of a layer, in order (:data:`STAGES`), each a place where a patch is written: ``resid_pre``
(block input), ``z`` (per-head attention output before ``W_O``; the tracer's ``heads`` site),
``attn_out``, ``resid_mid`` (as on the TransformerLens 4.3 bridge, writing it changes only the
MLP's input; the skip connection keeps the unpatched value), ``mlp_out``, ``resid`` (block
output).

Supported: the bridge's native models (``boot_native``: the zoo and tiny test models; LayerNorm,
RMSNorm or none, absolute or rotary positions, plain or gated MLP, attention-only) and Hugging
Face Llama, Mistral and Qwen2 decoders (SmolLM2). :meth:`Engine.of` returns None, with the reason,
for anything else (then callers use the plain batched bridge forward), and callers compare the
engine's unpatched logits with the bridge's before trusting it (:meth:`Engine.agrees`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.types import Model

STAGES: tuple[str, ...] = ("resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid")
#: tracer site name -> engine stage
SITE_STAGE: dict[str, str] = {"resid_pre": "resid_pre", "heads": "z", "attn_out": "attn_out",
                              "resid_mid": "resid_mid", "mlp_out": "mlp_out", "resid": "resid"}  # fmt: skip
_HF_DECODERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")

Rope = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class _Layer:
    ln1: Callable[[Tensor], Tensor]
    q: Callable[[Tensor], Tensor]
    k: Callable[[Tensor], Tensor]
    v: Callable[[Tensor], Tensor]
    o: Callable[[Tensor], Tensor]
    ln2: Callable[[Tensor], Tensor] | None
    mlp: Callable[[Tensor], Tensor] | None
    scale: float  # scores are multiplied by it
    rope: Rope | None


@dataclass
class RunCache:
    """Every stage of every layer of a full run, ``[layer, row, pos, ...]``, plus the (rotated)
    keys and values ``[layer, row, pos, kv_head, d_head]``."""

    acts: dict[str, Tensor]
    k: Tensor
    v: Tensor

    @property
    def rows(self) -> int:
        return int(self.k.shape[1])

    @property
    def n_pos(self) -> int:
        return int(self.k.shape[2])

    def select_rows(self, which: slice) -> RunCache:
        """The cache of some rows (views, no copy)."""
        return RunCache(acts={k: v[:, which] for k, v in self.acts.items()}, k=self.k[:, which],
                        v=self.v[:, which])  # fmt: skip

    def get(self, stage: str, layer: int) -> Tensor:
        """``[row, pos, ...]`` of one stage and layer."""
        return self.acts[stage][layer]


@dataclass
class Write:
    """Write ``values`` into packed tokens ``tokens`` (and heads ``heads``, stage ``z`` only) at
    one stage of one layer."""

    tokens: Tensor
    values: Tensor
    heads: Tensor | None = None


@dataclass
class Plan:
    """The packed rows of one batched suffix forward (see the module docstring).

    Row ``r`` continues row ``target_rows[r]`` of the target run: it *joins* the forward at stage
    ``stage`` of layer ``join_layer[r]`` (its state before that comes from the target cache) and
    computes positions ``start[r] .. n_pos-1``. Rows are sorted by join layer, so the rows (and
    packed tokens) active at any layer are a prefix: one forward serves variants patched at every
    layer, and each projection sees all of them at once.
    """

    target_rows: Tensor  # [R]
    start: Tensor  # [R]
    join_layer: Tensor  # [R], non-decreasing
    n_pos: int
    stage: str
    writes: dict[tuple[int, str], list[Write]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")
        if len(self.join_layer) > 1 and bool((self.join_layer[1:] < self.join_layer[:-1]).any()):
            raise ValueError("rows must be sorted by join layer")
        lengths = self.n_pos - self.start
        self.offsets = torch.cumsum(lengths, 0) - lengths  # [R]
        self.tok_row = torch.repeat_interleave(torch.arange(len(self.start)), lengths)
        self.tok_pos = torch.arange(int(lengths.sum())) - self.offsets[self.tok_row] + self.start[self.tok_row]
        self.lengths = lengths

    @property
    def layer(self) -> int:
        return int(self.join_layer.min())

    @property
    def n_tokens(self) -> int:
        return int(self.tok_row.numel())

    def active(self, layer: int) -> tuple[int, int, int, int]:
        """``(rows before, rows after, tokens before, tokens after)`` the rows joining at
        ``layer``."""
        r0 = int((self.join_layer < layer).sum())
        r1 = int((self.join_layer <= layer).sum())
        return r0, r1, int(self.lengths[:r0].sum()), int(self.lengths[:r1].sum())

    def token(self, rows: Tensor, positions: Tensor) -> Tensor:
        """Packed index of ``(row, position)`` pairs (positions must be >= the row's start)."""
        return self.offsets[rows] + positions - self.start[rows]

    def add(self, layer: int, stage: str, write: Write) -> None:
        self.writes.setdefault((layer, stage), []).append(write)


def _raw(mod: Any) -> Any:
    """The plain torch module under the bridge's wrappers (their hooks cost ~7x on small
    matmuls, and no hook may see the engine's packed tensors)."""
    while hasattr(mod, "_original_component"):
        mod = mod._original_component
    return mod


def _mlp(mod: Any, gated: tuple[str, str, str] | None, plain: tuple[str, str] | None,
         act: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:  # fmt: skip
    if gated is not None:
        g, u, d = (_raw(getattr(mod, n)) for n in gated)
        return lambda x: d(act(g(x)) * u(x))
    assert plain is not None
    i, o = (_raw(getattr(mod, n)) for n in plain)
    return lambda x: o(act(i(x)))


def _hf_layer(block: nn.Module, rotary: nn.Module | None) -> _Layer:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    block = _raw(block)
    attn = _raw(block.self_attn)

    def rope(q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        assert rotary is not None
        cos, sin = rotary(q, pos[None])  # [1, N, d_head]
        qr, kr = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
        return qr[0], kr[0]

    mlp = _raw(block.mlp)
    return _Layer(ln1=_raw(block.input_layernorm), q=_raw(attn.q_proj), k=_raw(attn.k_proj),
                  v=_raw(attn.v_proj), o=_raw(attn.o_proj), ln2=_raw(block.post_attention_layernorm),
                  mlp=_mlp(mlp, ("gate_proj", "up_proj", "down_proj"), None, mlp.act_fn),
                  scale=float(attn.scaling), rope=rope)  # fmt: skip


def _native_layer(block: nn.Module) -> _Layer:
    block = _raw(block)
    attn = _raw(block.attn)
    rot = attn.rotary

    def rope(q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        qr, kr = rot.apply_rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], position_ids=pos[None])
        return qr[0].transpose(0, 1), kr[0].transpose(0, 1)

    mlp: Callable[[Tensor], Tensor] | None = None
    if hasattr(block, "mlp"):
        m = _raw(block.mlp)
        mlp = (_mlp(m, ("gate", "in", "out"), None, m.act) if hasattr(m, "gate")
               else _mlp(m, None, ("fc_in", "fc_out"), m.act))  # fmt: skip
    ln2 = _raw(block.ln2) if hasattr(block, "ln2") else None
    return _Layer(ln1=_raw(block.ln1), q=_raw(attn.q), k=_raw(attn.k), v=_raw(attn.v), o=_raw(attn.o),
                  ln2=ln2, mlp=mlp, scale=1.0 / float(attn.scale),
                  rope=rope if rot is not None else None)  # fmt: skip


class Engine:
    """The blocks of one model as plain callables; see the module docstring.

    Build with :meth:`of`. ``dtype`` other than the model's (bf16 screening) works on a copy of
    the weights in that dtype.
    """

    def __init__(self, layers: list[_Layer], ln_final: Callable[[Tensor], Tensor], head: nn.Linear,
                 *, n_heads: int, n_kv: int, d_head: int, dtype: torch.dtype,
                 embed: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:  # fmt: skip
        self.layers, self.ln_final, self.head = layers, ln_final, head
        self.n_heads, self.n_kv, self.d_head, self.dtype = n_heads, n_kv, d_head, dtype
        self._embed = embed

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def why_not(cls, model: Model) -> str | None:
        """None if the engine can run ``model``; else why not (the caller then falls back)."""
        c = model.cfg
        try:
            blocks = [b._original_component for b in model.blocks]
            model.ln_final._original_component  # noqa: B018
            head = model.unembed._original_component
        except AttributeError as e:
            return f"not a bridge layout the engine knows ({e})"
        if not isinstance(head, nn.Linear):
            return f"unembedding is a {type(head).__name__}, not a Linear"
        name = type(blocks[0]).__name__
        if name == "NativeBlock":
            a = blocks[0].attn
            if not getattr(a, "causal", True):
                return "attention is not causal: later positions change earlier ones"
            if float(getattr(a, "attn_scores_soft_cap", 0.0) or 0.0) > 0:
                return "attention-score soft cap"
            if float(getattr(model.original_model, "output_logits_soft_cap", 0.0) or 0.0) > 0:
                return "logit soft cap"
            mlp = getattr(blocks[0], "mlp", None)
            if mlp is not None and getattr(mlp, "ln", None) is not None:
                return "SoLU-LN MLP"
            return None
        if name in _HF_DECODERS:
            a = blocks[0].self_attn
            if any(hasattr(a, n) for n in ("q_norm", "k_norm")):
                return "query/key norms"
            if getattr(model, "rotary_emb", None) is None:
                return "no rotary embedding module"
            if bool(getattr(c, "parallel_attn_mlp", False)):
                return "parallel attention/MLP"
            return None
        return f"block type {name} (the engine knows NativeBlock and {', '.join(_HF_DECODERS)})"

    @classmethod
    def of(cls, model: Model, dtype: torch.dtype | None = None) -> Engine | None:
        """The engine of ``model`` (None when :meth:`why_not` gives a reason)."""
        if cls.why_not(model) is not None:
            return None
        c = model.cfg
        blocks = [b._original_component for b in model.blocks]
        ln_final, head = _raw(model.ln_final), _raw(model.unembed)
        rotary = None
        if type(blocks[0]).__name__ in _HF_DECODERS:
            rotary = _raw(model.rotary_emb)
        param = next(model.parameters())
        if dtype is not None and dtype != param.dtype:
            blocks = [copy.deepcopy(b).to(dtype) for b in blocks]
            ln_final, head = copy.deepcopy(ln_final).to(dtype), copy.deepcopy(head).to(dtype)
            if rotary is not None:
                rotary = copy.deepcopy(rotary)
        layers = [_native_layer(b) if type(b).__name__ == "NativeBlock" else _hf_layer(b, rotary)
                  for b in blocks]  # fmt: skip
        if getattr(c, "attn_only", False):
            for ly in layers:
                ly.ln2 = ly.mlp = None
        n_kv = int(getattr(c, "n_key_value_heads", None) or c.n_heads)
        return cls(layers, ln_final, head, n_heads=int(c.n_heads), n_kv=n_kv, d_head=int(c.d_head),
                   dtype=dtype or param.dtype, embed=_embedding(model))  # fmt: skip

    # -- the forward -------------------------------------------------------------------------

    def full(self, resid0: Tensor) -> tuple[RunCache, Tensor]:
        """Run every layer on ``resid0 [row, pos, d_model]`` (the block input of layer 0), keep
        every stage; returns the cache and the final residual ``[row, pos, d_model]``."""
        rows, n_pos = resid0.shape[:2]
        zeros = torch.zeros(rows, dtype=torch.long)
        plan = Plan(target_rows=torch.arange(rows), start=zeros, join_layer=zeros, n_pos=n_pos,
                    stage="resid_pre")  # fmt: skip
        record: dict[str, list[Tensor]] = {s: [] for s in (*STAGES, "k", "v")}
        x = self.suffix(plan, None, resid0.reshape(rows * n_pos, -1), record=record)

        def stack(name: str) -> Tensor:
            return torch.stack([t.reshape(rows, n_pos, *t.shape[1:]) for t in record[name]])

        acts = {s: stack(s) for s in STAGES if record[s]}
        cache = RunCache(acts=acts, k=stack("k"), v=stack("v"))
        return cache, x.reshape(rows, n_pos, -1)

    def suffix(self, plan: Plan, cache: RunCache | None, x0: Tensor | None = None, *,
               record: dict[str, list[Tensor]] | None = None) -> Tensor:  # fmt: skip
        """Run ``plan`` to the end; returns the final residual (before the final norm)
        ``[n_tokens, d_model]``. ``cache``: the target run (None only for a full run from
        layer 0, given ``x0``)."""
        if cache is None and (x0 is None or plan.layer != 0 or plan.stage != "resid_pre"
                              or bool(plan.join_layer.any())):  # fmt: skip
            raise ValueError("a plan without a target cache must be a full run from layer 0")
        x = torch.zeros(0, int(self.head.weight.shape[1]), dtype=self.dtype, device=self.head.weight.device)
        for layer in range(plan.layer, self.n_layers):
            x = self._layer(layer, plan, cache, x, x0, record)
        return x

    def _write(self, plan: Plan, layer: int, stage: str, act: Tensor) -> Tensor:
        writes = plan.writes.get((layer, stage))
        if not writes:
            return act
        act = act.clone()
        for w in writes:
            if w.heads is None:
                act[w.tokens] = w.values.to(act.dtype)
            else:
                act[w.tokens, w.heads] = w.values.to(act.dtype)
        return act

    def _attention(self, ly: _Layer, layer: int, plan: Plan, cache: RunCache | None, h: Tensor,
                   n_rows: int, record: dict[str, list[Tensor]] | None) -> Tensor:  # fmt: skip
        """Attention of the packed tokens of rows ``0 .. n_rows-1`` (``h``: their ln1 output)."""
        n, H, kvh, dh = h.shape[0], self.n_heads, self.n_kv, self.d_head
        q, k, v = ly.q(h).view(n, H, dh), ly.k(h).view(n, kvh, dh), ly.v(h).view(n, kvh, dh)
        pos = plan.tok_pos[:n].to(h.device)
        if ly.rope is not None:
            q, k = ly.rope(q, k, pos)
        if record is not None and "k" in record:
            record["k"].append(k)
            record["v"].append(v)
        if n == 0:
            return q
        t = plan.n_pos
        row = plan.tok_row[:n].to(h.device)
        if cache is None:
            kf = k.new_zeros(n_rows, t, kvh, dh)
            vf = v.new_zeros(n_rows, t, kvh, dh)
        else:
            tr = plan.target_rows[:n_rows].to(h.device)
            kf = cache.k[layer][tr, :t].to(k.dtype)
            vf = cache.v[layer][tr, :t].to(v.dtype)
        kf[row, pos] = k
        vf[row, pos] = v
        start = plan.start[:n_rows].to(h.device)
        qmax = int((t - start).max())
        qi = pos - start[row]
        qp = q.new_zeros(n_rows, qmax, H, dh)
        qp[row, qi] = q
        if kvh != H:
            kf = kf.repeat_interleave(H // kvh, dim=2)
            vf = vf.repeat_interleave(H // kvh, dim=2)
        scores = torch.einsum("rqhd,rkhd->rhqk", qp, kf) * ly.scale
        qpos = start[:, None] + torch.arange(qmax, device=h.device)  # [R, Q]
        masked = torch.arange(t, device=h.device)[None, None, :] > qpos[:, :, None]  # [R, Q, T]
        scores = scores.masked_fill(masked[:, None], float("-inf"))
        pattern = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if record is not None and "pattern" in record:  # the last query of every row
            record["pattern"].append(pattern[:, :, -1])
        zp = torch.einsum("rhqk,rkhd->rqhd", pattern, vf)
        return zp[row, qi]  # [n, H, dh]

    def _layer(self, layer: int, plan: Plan, cache: RunCache | None, x: Tensor, x0: Tensor | None,
               record: dict[str, list[Tensor]] | None) -> Tensor:  # fmt: skip
        """One block. ``x``: the block input of the rows already running (a prefix of the packed
        tokens); rows joining here are appended at their stage, their state from the cache."""
        ly = self.layers[layer]
        r0, r1, n0, n1 = plan.active(layer)
        i = STAGES.index(plan.stage) if n1 > n0 else -1  # the joining stage, if any row joins

        def joined(stage: str, act: Tensor) -> Tensor:
            if n1 == n0:
                return act
            if cache is None:
                assert x0 is not None and stage == "resid_pre"
                new = x0[n0:n1].to(self.dtype)
            else:
                rows = plan.target_rows[plan.tok_row[n0:n1]]
                new = cache.get(stage, layer)[rows, plan.tok_pos[n0:n1]].to(self.dtype)
            return torch.cat([act.to(self.dtype), new])

        def keep(stage: str, act: Tensor) -> Tensor:
            act = self._write(plan, layer, stage, act)
            if record is not None and stage in record:
                record[stage].append(act)
            return act

        if i == 0:
            x = joined("resid_pre", x)
        x = keep("resid_pre", x)
        z = self._attention(ly, layer, plan, cache, ly.ln1(x), r1 if i == 0 else r0, record)
        if i == 1:
            z, x = joined("z", z), joined("resid_pre", x)
        z = keep("z", z)
        a = ly.o(z.reshape(z.shape[0], self.n_heads * self.d_head))
        if i == 2:
            a, x = joined("attn_out", a), joined("resid_pre", x)
        mid = x + keep("attn_out", a)
        if ly.mlp is None or ly.ln2 is None:
            out = mid
        else:
            if i == 3:
                mid = joined("resid_mid", mid)
            if record is not None and "resid_mid" in record:
                record["resid_mid"].append(mid)
            m = ly.mlp(ly.ln2(self._write(plan, layer, "resid_mid", mid)))
            if i == 4:
                m, mid = joined("mlp_out", m), joined("resid_mid", mid)
            out = mid + keep("mlp_out", m)
        if i == 5:
            out = joined("resid", out)
        return keep("resid", out)

    # -- decoding (key/value cache) ------------------------------------------------------------

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """The block input of layer 0 for ``tokens`` at ``positions`` (both ``[row, n]``): the
        token embedding plus the absolute position embedding if the model has one. Callers check
        it against the bridge (e.g. by :func:`agrees` on the logits of a prompt embedded here)."""
        if self._embed is None:
            raise ValueError("this engine has no embedding (the model's layout is not known)")
        return self._embed(tokens, positions).to(self.dtype)

    def prefill(self, resid0: Tensor) -> tuple[RunCache, Tensor, Tensor]:
        """Run a prompt ``resid0 [row, pos, d_model]`` keeping only the keys and values.

        Returns the cache (``acts`` empty), the final residual ``[row, pos, d_model]`` and the
        attention pattern of each row's last query ``[layer, row, head, key]``. Equal to
        :meth:`full` on the kept tensors (same code path, fewer recorded stages)."""
        rows, n_pos = resid0.shape[:2]
        zeros = torch.zeros(rows, dtype=torch.long)
        plan = Plan(target_rows=torch.arange(rows), start=zeros, join_layer=zeros, n_pos=n_pos,
                    stage="resid_pre")  # fmt: skip
        record: dict[str, list[Tensor]] = {"k": [], "v": [], "pattern": []}
        x = self.suffix(plan, None, resid0.reshape(rows * n_pos, -1), record=record)
        k = torch.stack([t.reshape(rows, n_pos, *t.shape[1:]) for t in record["k"]])
        v = torch.stack([t.reshape(rows, n_pos, *t.shape[1:]) for t in record["v"]])
        pattern = torch.stack(record["pattern"])
        return RunCache(acts={}, k=k, v=v), x.reshape(rows, n_pos, -1), pattern

    def step(self, cache: RunCache, resid0: Tensor) -> tuple[RunCache, Tensor, Tensor]:
        """One decoding step: every row gets one new token at position ``cache.n_pos``.

        Args:
            cache: keys and values of positions ``0 .. n_pos-1`` (from :meth:`prefill` or a
                previous step), ``[layer, row, pos, kv_head, d_head]``.
            resid0: the new tokens' block input of layer 0, ``[row, d_model]``.

        Returns:
            The cache grown by one position, the new tokens' final residual ``[row, d_model]``,
            and their attention patterns ``[layer, row, head, key]`` (``key = n_pos + 1``).
        """
        rows, t = cache.rows, cache.n_pos
        H, kvh, dh = self.n_heads, self.n_kv, self.d_head
        pos = torch.full((rows,), t, dtype=torch.long, device=resid0.device)
        x = resid0.to(self.dtype)
        ks, vs, pats = [], [], []
        for layer, ly in enumerate(self.layers):
            h = ly.ln1(x)
            q = ly.q(h).view(rows, H, dh)
            k, v = ly.k(h).view(rows, kvh, dh), ly.v(h).view(rows, kvh, dh)
            if ly.rope is not None:
                q, k = ly.rope(q, k, pos)
            kf = torch.cat([cache.k[layer].to(k.dtype), k[:, None]], dim=1)  # [row, t+1, kvh, dh]
            vf = torch.cat([cache.v[layer].to(v.dtype), v[:, None]], dim=1)
            ks.append(kf)
            vs.append(vf)
            if kvh != H:
                kf = kf.repeat_interleave(H // kvh, dim=2)
                vf = vf.repeat_interleave(H // kvh, dim=2)
            scores = torch.einsum("rhd,rkhd->rhk", q, kf) * ly.scale
            pattern = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            pats.append(pattern)
            z = torch.einsum("rhk,rkhd->rhd", pattern, vf)
            mid = x + ly.o(z.reshape(rows, H * dh))
            x = mid if ly.mlp is None or ly.ln2 is None else mid + ly.mlp(ly.ln2(mid))
        return RunCache(acts={}, k=torch.stack(ks), v=torch.stack(vs)), x, torch.stack(pats)

    # -- outputs -----------------------------------------------------------------------------

    def logits(self, x: Tensor, columns: Tensor | None = None) -> Tensor:
        """Logits of final residuals ``x [n, d_model]``: every vocabulary entry ``[n, vocab]``,
        or only ``columns [n, k]`` (``[n, k]``; the unembedding rows gathered, not the whole
        matrix multiplied)."""
        h = self.ln_final(x)
        if columns is None:
            return self.head(h).float()
        w = self.head.weight[columns]  # [n, k, d]
        out = torch.einsum("nd,nkd->nk", h, w)
        if self.head.bias is not None:
            out = out + self.head.bias[columns]
        return out.float()


def _embedding(model: Model) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``(tokens, positions) -> resid0`` from the bridge's raw embedding modules: a native model
    adds its absolute position embedding (none when rotary); a Hugging Face decoder of
    :data:`_HF_DECODERS` (Llama, Mistral, Qwen2) feeds the unscaled token embedding."""
    tok = _raw(getattr(model, "embed", None))
    if not isinstance(tok, nn.Embedding):
        return None
    pos_mod = getattr(model, "pos_embed", None)
    pos = _raw(pos_mod) if pos_mod is not None else None
    if pos is not None and not isinstance(pos, nn.Embedding):
        return None
    if pos is None:
        return lambda tokens, positions: tok(tokens)
    return lambda tokens, positions: tok(tokens) + pos(positions)


def agrees(engine_logits: Tensor, bridge_logits: Tensor) -> tuple[bool, float]:
    """Is the engine's unpatched run the bridge's? ``max|a - b| <= 1e-4 * max|b| + 1e-5`` (the
    fp32 gate of PERFORMANCE.md, applied loosened 10x for a reduced-precision engine is up to
    the caller). Returns the verdict and the max difference."""
    diff = float((engine_logits.detach().float() - bridge_logits.detach().float()).abs().max())
    scale = float(bridge_logits.detach().float().abs().max())
    return (math.isfinite(diff) and diff <= 1e-4 * scale + 1e-5), diff


def flops_per_token(model: Model) -> dict[str, float]:
    """Matmul FLOPs of one token through one layer (``layer``) and the unembedding (``head``),
    ignoring the attention scores (small at these lengths)."""
    c = model.cfg
    d, dh, h = int(c.d_model), int(c.d_head), int(c.n_heads)
    kv = int(getattr(c, "n_key_value_heads", None) or h)
    attn = 2 * d * dh * (2 * h + 2 * kv)
    mlp = 0.0
    if not getattr(c, "attn_only", False):
        d_mlp = int(getattr(c, "d_mlp", None) or 4 * d)
        mlp = 2 * d * d_mlp * (3 if getattr(c, "gated_mlp", False) else 2)
    return {"layer": float(attn + mlp), "head": float(2 * d * int(c.d_vocab))}


__all__ = ["SITE_STAGE", "STAGES", "Engine", "Plan", "RunCache", "Write", "agrees", "flops_per_token"]
