"""Plain-torch reference of the attention statistics: the semantics the Triton kernel must match.

For one layer's rotated queries and keys (self-attention, ``T`` positions)::

    q [batch, head, pos, d_head]        k [batch, kv_head, pos, d_head]
    A[b, h, i, j] = softmax_j(scale * q[b, h, i] . k[b, h // group, j])   group = head // kv_head

with the causal mask ``j <= i`` (when ``causal``) and the keys ``j >= lengths[b]`` masked (right
padding). Queries ``i >= lengths[b]`` are padding and contribute nothing (``lse = -inf``). From
``A``, without ever holding it whole::

    lse          [batch, head, query]           log-sum-exp of the masked scaled scores
    entropy      [batch, head, query]           -sum_j A log A in nats (0: padded)
    received     [batch, head, key]             sum over real queries i of A[i, j]
    segment_mass [batch, head, query, segment]  sum of A[i, start:end) per segment (0: padded)
    argmax, max_weight       [batch, head, selected]     of the selected query rows
    top_idx, top_weight      [batch, head, selected, k]  top-k keys by weight, descending

The queries are processed in blocks of ``block`` rows: one block's scores ``[batch, head, block,
keys it can see]`` (fp32), turned into their exponentials in place, in one buffer allocated once
and reused by every block (so the allocator cannot fragment), are the largest tensor alive: memory
is O(block * T), never O(T^2). Only three passes touch the block elementwise (the row max, the
exponential, the row sum); the two reductions that need the weights are matrix products:
``sum_j e_ij s_ij = q_i . (sum_j e_ij k_j)`` for the entropy and ``sum_i e_ij / den_i`` for the
received attention.
Scores are computed in fp32 whatever the input dtype, and the softmax of each row is exact (its
whole row is in the block). Grouped-query attention folds the group into the rows of the block
(``[batch, kv_head, group * block, d_head]`` against ``[batch, kv_head, d_head, keys]``), so ``k``
is never repeated per head.

Inputs are assumed valid: :func:`mechscope.kernels.attention_stats` checks them, resolves the
selected queries per row and dispatches here or to :mod:`mechscope.kernels.attn_stats.triton`.
Tests and benchmarks import this module as the oracle; :func:`stats_from_pattern` is the dense
oracle that reads the same statistics from a materialised pattern.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

#: Bytes one block's fp32 scores may take when ``block`` is not given (the working set is about
#: twice this: the scores and their exponentials).
BLOCK_BYTES = 32 * 2**20
#: The fewest query rows in a block, however long the sequence.
MIN_BLOCK = 16


class AttnStats(NamedTuple):
    """Per-row and per-key statistics of one layer's attention (all floats fp32, indices int64).

    Padded queries (``i >= lengths[b]``) have ``lse = -inf`` (the log of an empty sum; ``NaN``
    everywhere from :func:`stats_from_pattern`, which has no scores), ``entropy = 0`` and
    ``segment_mass = 0``, and add nothing to ``received``. Top-k slots beyond the keys a query can
    see hold index ``-1`` and weight ``0``.
    """

    lse: Float[Tensor, "batch head query"]
    entropy: Float[Tensor, "batch head query"]
    received: Float[Tensor, "batch head key"]
    segment_mass: Float[Tensor, "batch head query segment"]
    argmax: Int[Tensor, "batch head selected"]
    max_weight: Float[Tensor, "batch head selected"]
    top_idx: Int[Tensor, "batch head selected k"]
    top_weight: Float[Tensor, "batch head selected k"]


def default_block(n_batch: int, n_head: int, n_pos: int) -> int:
    """Query rows per block so that one block's fp32 scores take at most :data:`BLOCK_BYTES`."""
    rows = BLOCK_BYTES // max(1, n_batch * n_head * n_pos * 4)
    return max(1, min(n_pos, max(MIN_BLOCK, rows)))


def selected_rows(
    q: Tensor, k: Tensor, scale: float, lengths: Tensor, causal: bool, queries: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Argmax and top-k of the selected query rows, from their recomputed scores.

    Args:
        q: ``[batch, head, pos, d_head]``; k: ``[batch, kv_head, pos, d_head]``.
        scale: the softmax scale.
        lengths: ``[batch]`` int64 real tokens per row.
        causal: mask keys after the query.
        queries: ``[batch, selected]`` int64 positions, already resolved per row (all real).
        top_k: keys kept per row.

    Returns:
        ``(argmax, max_weight, top_idx, top_weight)``: ``[batch, head, selected]`` int64 and fp32,
        ``[batch, head, selected, top_k]`` int64 and fp32. Memory O(batch * head * selected * T).
    """
    n_batch, n_head, n_pos, d = q.shape
    n_kv = k.shape[1]
    n_sel = queries.shape[1]
    idx = queries[:, None, :, None].expand(n_batch, n_head, n_sel, d)
    qs = q.gather(2, idx).float().reshape(n_batch, n_kv, -1, d)  # [batch, kv, group*sel, d]
    s = torch.matmul(qs, k.float().transpose(-1, -2)).mul_(scale)  # [batch, kv, group*sel, pos]
    s = s.reshape(n_batch, n_head, n_sel, n_pos)
    keys = torch.arange(n_pos, device=q.device)
    hidden = keys >= lengths[:, None, None, None]  # [batch, 1, 1, pos]
    if causal:
        hidden = hidden | (keys > queries[:, None, :, None])  # [batch, 1, selected, pos]
    s.masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # every selected row sees a key: finite
    amax = s.argmax(dim=-1)  # the first maximum, as the kernel
    max_w = torch.exp(s.gather(-1, amax[..., None]) - lse)[..., 0]
    top_s, top_i = torch.topk(s, top_k, dim=-1)
    unseen = top_s == float("-inf")
    top_w = torch.where(unseen, 0.0, torch.exp(top_s - lse))
    return amax, max_w, top_i.masked_fill(unseen, -1), top_w


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
    """The statistics of ``softmax(scale * q k^T + mask)``, one block of query rows at a time.

    Args:
        q: ``[batch, head, pos, d_head]`` float (fp32/fp16/bf16/fp64), the rotated queries.
        k: ``[batch, kv_head, pos, d_head]``, same dtype and device; ``head % kv_head == 0``.
        scale: the softmax scale (usually ``1 / sqrt(d_head)``).
        lengths: ``[batch]`` int64 real tokens per row (``1..pos``), on ``q.device``.
        causal: mask keys after the query.
        queries: ``[batch, selected]`` int64 selected query positions, resolved per row, real.
        top_k: keys kept per selected row, ``1..pos``.
        segments: ``[segment, 2]`` int64 ``(start, end)`` key ranges, end exclusive, in ``0..pos``.
        block: query rows per block (``None``: :func:`default_block`).

    Returns:
        :class:`AttnStats`, exact up to fp32 rounding.
    """
    n_batch, n_head, n_pos, d = q.shape
    n_kv = k.shape[1]
    group = n_head // n_kv
    dev = q.device
    block = min(block or default_block(n_batch, n_head, n_pos), n_pos)
    neg = float("-inf")
    qs = q.float() * scale  # the scale folded into the queries: O(T d)
    kf = k.float().reshape(n_batch * n_kv, n_pos, d)  # [batch*kv, pos, d]
    kt = kf.transpose(1, 2)  # [batch*kv, d, pos]
    lse = torch.full((n_batch, n_head, n_pos), neg, device=dev)
    entropy = torch.zeros(n_batch, n_head, n_pos, device=dev)
    received = torch.zeros(n_batch, n_head, n_pos, device=dev)
    mass = torch.zeros(n_batch, n_head, n_pos, segments.shape[0], device=dev)
    spans = [(int(a), int(b)) for a, b in segments.tolist()]
    keys = torch.arange(n_pos, device=dev)
    padded = bool((lengths < n_pos).any())
    key_pad = (keys >= lengths[:, None])[:, None, None, :]  # [batch, 1, 1, pos]
    above = torch.ones(block, block, dtype=torch.bool, device=dev).triu_(1)  # key > query
    # one block buffer (the scores, then in place their exponentials), allocated once and reused
    # by every block (so the allocator cannot fragment)
    buf = torch.empty(n_batch * n_head * block * n_pos, device=dev)
    for start in range(0, n_pos, block):
        end = min(start + block, n_pos)
        blk = end - start
        kend = end if causal else n_pos  # the keys this block can see
        n = n_batch * n_head * blk * kend
        qb = qs[:, :, start:end].reshape(n_batch * n_kv, group * blk, d)
        s = torch.bmm(qb, kt[..., :kend], out=buf[:n].view(n_batch * n_kv, group * blk, kend))
        s = s.view(n_batch, n_head, blk, kend)  # scaled scores [batch, head, blk, kend]
        if padded:
            s.masked_fill_(key_pad[..., :kend], neg)
        if causal:
            s[..., start:end].masked_fill_(above[:blk, :blk], neg)  # keys before start: all seen
        m = s.amax(dim=-1, keepdim=True)  # [batch, head, blk, 1]
        m = torch.where(torch.isfinite(m), m, 0.0)
        e = s.sub_(m).exp_()  # exp(s - m) in place; 0 where hidden
        if padded:
            e.masked_fill_((keys[start:end] >= lengths[:, None])[:, None, :, None], 0.0)
        den = e.sum(dim=-1)  # [batch, head, blk]
        seen = den > 0
        inv = torch.where(seen, 1.0 / torch.where(seen, den, 1.0), 0.0)
        # sum_j e_j s_j = q_i . (sum_j e_j k_j): one matmul instead of a pass over the block
        e3 = e.view(n_batch * n_kv, group * blk, kend)
        es = (torch.bmm(e3, kf[:, :kend]) * qb).sum(-1).view(n_batch, n_head, blk)
        # entropy = log den - sum_j p_j (s_j - m)
        lse[:, :, start:end] = m[..., 0] + torch.log(den)
        entropy[:, :, start:end] = torch.where(seen, torch.log(torch.where(seen, den, 1.0))
                                               - (es * inv - m[..., 0]), 0.0)  # fmt: skip
        # the attention each key gets from the block's rows: sum_i e_ij / den_i, a matmul
        e2 = e.reshape(n_batch * n_head, blk, kend)
        received[:, :, :kend] += torch.bmm(inv.reshape(-1, 1, blk), e2).view(n_batch, n_head, kend)
        for i, (a, b) in enumerate(spans):
            if a < kend:
                mass[:, :, start:end, i] = e[..., a : min(b, kend)].sum(dim=-1) * inv
    del buf
    amax, max_w, top_i, top_w = selected_rows(q, k, scale, lengths, causal, queries, top_k)
    return AttnStats(lse, entropy, received, mass, amax, max_w, top_i, top_w)


def stats_from_pattern(
    pattern: Tensor, lengths: Tensor, queries: Tensor, top_k: int, segments: Tensor
) -> AttnStats:
    """The same statistics read from a materialised, already softmaxed pattern (the dense oracle).

    Args:
        pattern: ``[batch, head, pos, pos]`` float attention weights (query, key).
        lengths: ``[batch]`` int64 real tokens per row; queries past it are dropped.
        queries: ``[batch, selected]`` int64 selected query positions, resolved per row.
        top_k: keys kept per selected row.
        segments: ``[segment, 2]`` int64 ``(start, end)`` key ranges.

    Returns:
        :class:`AttnStats` with ``lse`` all ``NaN`` (a pattern has no scores). Computed in the
        pattern's dtype or fp32, whichever is wider, and returned in fp32. Keys of weight exactly 0
        count as unseen in the top-k (index ``-1``). The pattern is read as is: weights it puts on
        padded keys are not removed.
    """
    ct = torch.float64 if pattern.dtype == torch.float64 else torch.float32
    p = pattern.to(ct)
    n_batch, n_head, n_pos, _ = p.shape
    real = torch.arange(n_pos, device=p.device) < lengths[:, None]  # [batch, pos]
    p = p * real[:, None, :, None]  # padded queries dropped
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    received = p.sum(dim=-2)
    cols = [p[..., int(a) : int(b)].sum(dim=-1) for a, b in segments.tolist()]
    mass = torch.stack(cols, dim=-1) if cols else p.new_zeros(n_batch, n_head, n_pos, 0)
    n_sel = queries.shape[1]
    rows = p.gather(2, queries[:, None, :, None].expand(n_batch, n_head, n_sel, n_pos))
    amax = rows.argmax(dim=-1)
    max_w = rows.gather(-1, amax[..., None])[..., 0]
    top_w, top_i = torch.topk(rows, top_k, dim=-1)
    lse = torch.full((n_batch, n_head, n_pos), float("nan"), device=p.device)
    return AttnStats(
        lse,
        entropy.float(),
        received.float(),
        mass.float(),
        amax,
        max_w.float(),
        top_i.masked_fill(top_w == 0, -1),
        top_w.float(),
    )
