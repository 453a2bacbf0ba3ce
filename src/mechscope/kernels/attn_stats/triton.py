"""Triton kernels of the attention statistics (same contract as ``reference.py``).

Two launches, each holding one ``BLOCK_M x BLOCK_N`` tile of scores at a time (flash attention's
forward and backward layout); nothing of size ``T x T`` is ever written:

1. ``_rows_kernel``, one program per (batch * head, block of queries): an online softmax over the
   key blocks the queries can see (running max ``m`` and sum ``l``, ``den`` in the code). Per
   row it also accumulates ``t = sum_j e^(s_j - m) (s_j - m)`` (entropy ``= log l - t / l``,
   free of the cancellation of ``lse - E[s]``) and the segment sums ``sum_{j in seg}
   e^(s_j - m)`` (one ``[BLOCK_N, SEG]`` membership product per tile, IEEE fp32), each rescaled
   by ``e^(m_old - m_new)`` when the max grows, and keeps the first argmax of the scores (the
   argmax of the weights; its weight is ``1 / l``). Writes ``lse``, ``entropy``,
   ``segment_mass`` and the per-row argmax and max weight.
2. ``_received_kernel``, one program per (batch * head, block of keys): recomputes each score tile
   with ``p = exp(s - lse)`` over the query blocks that see those keys and sums the columns.
   Each key block belongs to one program, so there are no atomics and the sums are deterministic.

Scores are ``scale * q . k`` in fp32: fp16/bf16 tiles go to ``tl.dot`` with fp32 accumulation
(the products are exact), fp32 tiles with ``input_precision="ieee"`` (no TF32); fp64 inputs are
cast to fp32 first. Grouped-query attention reads key head ``h // group``; nothing is repeated.

Top-k with ``k > 1`` is not computed in the kernel: the wrapper recomputes the scores of only the
selected rows in torch (:func:`~mechscope.kernels.attn_stats.reference.selected_rows`,
O(batch * head * selected * T) memory) and keeps the kernel's argmax and max weight.

Jitted on first use, so ``TRITON_INTERPRET=1`` set before the first call runs it on CPU tensors.
The reductions are written ``tl.reduce(x, axis, tl.standard._sum_combine)`` (what ``tl.sum``,
``tl.max`` and ``tl.min`` expand to) because those three are themselves jitted when ``triton`` is
imported: imported before ``TRITON_INTERPRET=1`` was set, they cannot be called by the
interpreter, whereas ``tl.reduce`` with these combine functions is interpreted in numpy.
"""

from __future__ import annotations

from typing import Any, no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor

from mechscope.kernels.attn_stats import reference
from mechscope.kernels.attn_stats.reference import AttnStats

_JITTED: dict[tuple[str, bool], Any] = {}
_MAX_BLOCK = 128


@no_type_check
def _rows_kernel(
    q_ptr, k_ptr, len_ptr, seg_ptr,
    lse_ptr, ent_ptr, mass_ptr, amax_ptr, maxw_ptr,
    n_head, group, n_pos, d, n_seg, scale,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kh, s_kt, s_kd,
    CAUSAL: tl.constexpr, F32_DOT: tl.constexpr, HAS_SEG: tl.constexpr, SEG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_head
    h = bh % n_head
    length = tl.load(len_ptr + b).to(tl.int64)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    real_q = offs_m < length
    q = tl.load(
        q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
        mask=real_q[:, None] & (offs_d[None, :] < d), other=0.0,
    )  # fmt: skip
    if F32_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + b * s_kb + (h // group) * s_kh
    seg_cols = tl.arange(0, SEG)
    if HAS_SEG:
        seg_start = tl.load(seg_ptr + 2 * seg_cols, mask=seg_cols < n_seg, other=0)
        seg_end = tl.load(seg_ptr + 2 * seg_cols + 1, mask=seg_cols < n_seg, other=0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.full([BLOCK_M], 0.0, tl.float32)
    t = tl.full([BLOCK_M], 0.0, tl.float32)
    seg_acc = tl.full([BLOCK_M, SEG], 0.0, tl.float32)
    best = tl.full([BLOCK_M], 0, tl.int64)
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, (tl.program_id(1).to(tl.int64) + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        kt = tl.load(
            k_base + offs_n[None, :] * s_kt + offs_d[:, None] * s_kd,
            mask=n_ok[None, :] & (offs_d[:, None] < d), other=0.0,
        )  # [BLOCK_D, BLOCK_N]  # fmt: skip
        if F32_DOT:  # noqa: SIM108 (a constexpr branch)
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee") * scale
        else:
            s = tl.dot(q, kt) * scale  # [BLOCK_M, BLOCK_N] fp32: fp16/bf16 products are exact
        valid = real_q[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        blk_max = tl.reduce(s, 1, tl.standard._elementwise_max)  # tl.max (see the module docstring)
        at_max = tl.where(valid & (s == blk_max[:, None]), offs_n[None, :], n_pos)
        first = tl.reduce(at_max, 1, tl.standard._elementwise_min)  # the first key at the max
        best = tl.where(blk_max > m, first, best)  # strict: an earlier key wins a tie
        m_new = tl.maximum(m, blk_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # 0 while nothing was seen
        x = tl.where(valid, s - m_safe[:, None], 0.0)
        p = tl.where(valid, tl.exp(x), 0.0)
        shift = tl.where(den > 0, m, m_safe) - m_safe  # m_old - m_new; 0 before any key
        t = alpha * (t + shift * den) + tl.reduce(p * x, 1, tl.standard._sum_combine)
        den = alpha * den + tl.reduce(p, 1, tl.standard._sum_combine)
        if HAS_SEG:
            inside = (offs_n[:, None] >= seg_start[None, :]) & (offs_n[:, None] < seg_end[None, :])
            seg_acc = seg_acc * alpha[:, None] + tl.dot(
                p, inside.to(tl.float32), input_precision="ieee"
            )
        m = m_new
    seen = den > 0
    l_safe = tl.where(seen, den, 1.0)
    out_row = bh * n_pos + offs_m
    in_seq = offs_m < n_pos
    tl.store(lse_ptr + out_row, tl.where(seen, m + tl.log(l_safe), float("-inf")), mask=in_seq)
    tl.store(ent_ptr + out_row, tl.where(seen, tl.log(l_safe) - t / l_safe, 0.0), mask=in_seq)
    tl.store(amax_ptr + out_row, best, mask=in_seq)
    tl.store(maxw_ptr + out_row, tl.where(seen, 1.0 / l_safe, 0.0), mask=in_seq)
    if HAS_SEG:
        mass = tl.where(seen[:, None], seg_acc / l_safe[:, None], 0.0)
        tl.store(
            mass_ptr + out_row[:, None] * n_seg + seg_cols[None, :], mass,
            mask=in_seq[:, None] & (seg_cols[None, :] < n_seg),
        )  # fmt: skip


@no_type_check
def _received_kernel(
    q_ptr, k_ptr, len_ptr, lse_ptr, recv_ptr,
    n_head, group, n_pos, d, scale,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kh, s_kt, s_kd,
    CAUSAL: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_head
    h = bh % n_head
    length = tl.load(len_ptr + b).to(tl.int64)
    start_n = tl.program_id(1).to(tl.int64) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < length
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + (h // group) * s_kh
    kt = tl.load(
        k_base + offs_n[None, :] * s_kt + offs_d[:, None] * s_kd,
        mask=n_ok[None, :] & (offs_d[:, None] < d), other=0.0,
    )  # [BLOCK_D, BLOCK_N]: these keys, for every query block  # fmt: skip
    if F32_DOT:
        kt = kt.to(tl.float32)
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # the first query block that sees these keys
    for start_m in range(lo, length, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        real_q = offs_m < length
        q = tl.load(
            q_base + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
            mask=real_q[:, None] & (offs_d[None, :] < d), other=0.0,
        )  # fmt: skip
        lse = tl.load(lse_ptr + bh * n_pos + offs_m, mask=real_q, other=0.0)
        if F32_DOT:  # noqa: SIM108 (a constexpr branch)
            s = tl.dot(q.to(tl.float32), kt, input_precision="ieee") * scale
        else:
            s = tl.dot(q, kt) * scale  # [BLOCK_M, BLOCK_N] fp32: fp16/bf16 products are exact
        valid = real_q[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.exp(tl.where(valid, s - lse[:, None], 0.0)), 0.0)
        acc += tl.reduce(p, 0, tl.standard._sum_combine)  # tl.sum
    tl.store(recv_ptr + bh * n_pos + offs_n, acc, mask=offs_n < n_pos)


def _kernel(name: str) -> Any:
    interpret = bool(triton.knobs.runtime.interpret)
    if (name, interpret) not in _JITTED:
        fn = {"rows": _rows_kernel, "received": _received_kernel}[name]
        _JITTED[(name, interpret)] = triton.jit(fn)
    return _JITTED[(name, interpret)]


def _blocks(n_pos: int, d: int, block: int | None) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D)``: powers of two >= 16 (``tl.dot``'s smallest tile)."""
    block_d = max(16, triton.next_power_of_2(d))
    if block is None:
        block_m, block_n = 64, (64 if block_d <= 64 else 32)
    else:
        block_m = block_n = min(_MAX_BLOCK, triton.next_power_of_2(block))
    cap = max(16, triton.next_power_of_2(n_pos))
    return max(16, min(block_m, cap)), max(16, min(block_n, cap)), block_d


def attention_stats(
    q: Tensor,
    k: Tensor,
    scale: float,
    lengths: Tensor,
    causal: bool,
    queries: Tensor,
    top_k: int,
    segments: Tensor,
    block: int | None = None,
) -> AttnStats:
    """The statistics of ``softmax(scale * q k^T + mask)`` by the fused kernels.

    Same contract as :func:`mechscope.kernels.attn_stats.reference.attention_stats`; inputs are
    assumed checked by :func:`mechscope.kernels.attention_stats`. ``block`` sets both tile sides
    (rounded up to a power of two, 16 to 128); ``None``: 64 x 64 (64 x 32 for ``d_head > 64``).
    """
    if q.dtype == torch.float64:
        q, k = q.float(), k.float()
    n_batch, n_head, n_pos, d = q.shape
    group = n_head // k.shape[1]
    dev = q.device
    n_seg = segments.shape[0]
    lse = torch.empty(n_batch, n_head, n_pos, device=dev)
    entropy = torch.empty_like(lse)
    received = torch.empty_like(lse)
    mass = torch.empty(n_batch, n_head, n_pos, n_seg, device=dev)
    amax = torch.empty(n_batch, n_head, n_pos, dtype=torch.int64, device=dev)
    maxw = torch.empty_like(lse)
    lengths = lengths.to(device=dev, dtype=torch.int64).contiguous()
    seg = segments.to(device=dev, dtype=torch.int64).contiguous()
    if seg.numel() == 0:
        seg = torch.zeros(2, dtype=torch.int64, device=dev)
    block_m, block_n, block_d = _blocks(n_pos, d, block)
    # fp32 tiles with an IEEE dot for fp32 inputs; for bf16 too under the interpreter, whose
    # numpy dot cannot multiply bf16 (compiled, bf16 tiles go to the tensor cores as they are)
    f32_dot = q.dtype == torch.float32 or (
        q.dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)
    )
    if n_batch * n_head * n_pos > 0:
        _kernel("rows")[(n_batch * n_head, triton.cdiv(n_pos, block_m))](
            q, k, lengths, seg,
            lse, entropy, mass, amax, maxw,
            n_head, group, n_pos, d, n_seg, float(scale),
            *q.stride(), *k.stride(),
            CAUSAL=bool(causal), F32_DOT=f32_dot, HAS_SEG=n_seg > 0,
            SEG=max(16, triton.next_power_of_2(max(n_seg, 1))),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        _kernel("received")[(n_batch * n_head, triton.cdiv(n_pos, block_n))](
            q, k, lengths, lse, received,
            n_head, group, n_pos, d, float(scale),
            *q.stride(), *k.stride(),
            CAUSAL=bool(causal), F32_DOT=f32_dot,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
    n_sel = queries.shape[1]
    idx = queries.to(dev)[:, None, :].expand(n_batch, n_head, n_sel)
    argmax, max_w = amax.gather(2, idx), maxw.gather(2, idx)
    if top_k == 1:
        top_i, top_w = argmax[..., None], max_w[..., None]
    else:
        _, _, top_i, top_w = reference.selected_rows(
            q, k, scale, lengths, causal, queries.to(dev), top_k
        )
    return AttnStats(lse, entropy, received, mass, argmax, max_w, top_i, top_w)
