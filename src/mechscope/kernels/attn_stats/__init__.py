"""Attention statistics of one layer without materialising the ``[query, key]`` pattern.

Long-context head analyses (sinks, retrieval and streaming heads) need a few numbers per row or
per key of a layer's attention, not the pattern itself, which is O(T^2) per head. This op reads
them from the layer's *rotated* queries and keys, block by block::

    q [batch, head, pos, d_head]        k [batch, kv_head, pos, d_head]     (head % kv_head == 0)
    A[b, h, i, j] = softmax_j(scale * q[b, h, i] . k[b, h // (head // kv_head), j])
        masked: j > i (causal), j >= lengths[b] (right padding); queries i >= lengths[b] are padding

    lse          [batch, head, query]           row log-sum-exp of the masked scaled scores
    entropy      [batch, head, query]           row entropy in nats
    received     [batch, head, key]             sum over real queries i (0 included) of A[i, j]
    segment_mass [batch, head, query, segment]  sum of A[i, start:end) per segment
    argmax, max_weight      [batch, head, selected]     of the selected query rows
    top_idx, top_weight     [batch, head, selected, k]  top-k keys by weight, descending

The key grouping is HF's ``repeat_kv`` (``repeat_interleave``): query head ``h`` reads key head
``h // (head // kv_head)``. Scores are computed in fp32 whatever the input dtype. Padded queries
have ``lse = -inf``, ``entropy = 0``, ``segment_mass = 0`` and add nothing to ``received``.
There is no autograd: the outputs never require grad.

Dispatch (rules in :mod:`mechscope.kernels._dispatch`): the fused Triton kernels
(``triton.py``: an online softmax per query block, then a second pass per key block for
``received``; one score tile at a time; top-k for ``k > 1`` recomputes only the selected rows'
scores in torch, O(selected * T)) on CUDA tensors, the plain-torch reference
(``reference.py``: exact softmax over blocks of query rows, one block of scores at a time)
otherwise. Both use O(block * T) memory, never O(T^2). :func:`stats_from_pattern` reads the same
statistics from a materialised pattern (the dense oracle, and the path for a bridge's
``hook_pattern``); :func:`act_mean` turns ``received`` into the mean attention a key receives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.kernels import _dispatch
from mechscope.kernels.attn_stats import reference
from mechscope.kernels.attn_stats.reference import AttnStats

__all__ = ["AttnStats", "act_mean", "attention_stats", "stats_from_pattern"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Queries = Sequence[int] | Tensor | None
Segments = Sequence[tuple[int, int]] | Tensor | None


def _is_int_tensor(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_lengths(lengths: object, n_batch: int, n_pos: int, device: torch.device) -> Tensor:
    """``[batch]`` int64 real tokens per row on ``device`` (all ``n_pos`` when ``None``).

    The validators take ``object``: they exist to reject whatever they are given.
    """
    if lengths is None:
        return torch.full((n_batch,), n_pos, dtype=torch.int64, device=device)
    if (
        not isinstance(lengths, Tensor)
        or lengths.shape != (n_batch,)
        or not _is_int_tensor(lengths)
    ):
        raise InputError(
            f"lengths must be an integer tensor of shape [{n_batch}] (real tokens per row, right "
            f"padding), got {lengths!r:.80}; pass e.g. attention_mask.sum(-1)"
        )
    if n_batch and (int(lengths.min()) < 1 or int(lengths.max()) > n_pos):
        raise InputError(
            f"lengths run from {int(lengths.min())} to {int(lengths.max())} but every row needs "
            f"1..{n_pos} real tokens (the sequence has {n_pos}); drop empty rows"
        )
    return lengths.to(device=device, dtype=torch.int64)


def resolve_queries(queries: object, lengths: Tensor) -> Tensor:
    """``[batch, selected]`` int64 query positions, negative ones counted from each row's end.

    ``queries`` is ``[selected]`` (the same for every row) or ``[batch, selected]``; ``-1`` is
    the last real token of each row. Every resolved position must be a real token of its row.
    """
    n_batch = lengths.shape[0]
    dev = lengths.device
    if queries is None:
        return torch.zeros(n_batch, 0, dtype=torch.int64, device=dev)
    if isinstance(queries, Tensor):
        if not _is_int_tensor(queries) or queries.ndim not in (1, 2):
            raise InputError(
                f"queries is a {queries.dtype} tensor of shape {tuple(queries.shape)}; pass "
                f"integer positions, [selected] or [batch, selected] (negative: from the row's end)"
            )
        sel = queries.to(device=dev, dtype=torch.int64)
    else:
        if (
            not isinstance(queries, Sequence)
            or isinstance(queries, str)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in queries)
        ):
            raise InputError(
                f"queries is {queries!r:.80}; pass a list of int positions (negative: from each "
                f"row's end, -1 = the last real token)"
            )
        sel = torch.tensor(list(queries), dtype=torch.int64, device=dev)
    if sel.ndim == 1:
        sel = sel.expand(n_batch, -1)
    if sel.shape[0] != n_batch:
        raise InputError(
            f"queries has shape {tuple(sel.shape)} but the batch has {n_batch} rows; pass "
            f"[selected] positions or [{n_batch}, selected]"
        )
    resolved = torch.where(sel < 0, sel + lengths[:, None], sel)
    bad = (resolved < 0) | (resolved >= lengths[:, None])
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise InputError(
            f"selected query {int(sel[b, j])} is out of range for row {b}, which has "
            f"{int(lengths[b])} real tokens; use 0..{int(lengths[b]) - 1} or "
            f"-{int(lengths[b])}..-1 (negative: from the row's end)"
        )
    return resolved.contiguous()


def resolve_segments(segments: object, n_pos: int, device: torch.device) -> Tensor:
    """``[segment, 2]`` int64 ``(start, end)`` key ranges, checked against ``n_pos``."""
    if segments is None:
        return torch.zeros(0, 2, dtype=torch.int64, device=device)
    pairs: list[list[int]] | None = None
    if isinstance(segments, Tensor):
        if _is_int_tensor(segments) and segments.ndim == 2 and segments.shape[1] == 2:
            pairs = segments.tolist()
    elif isinstance(segments, Sequence) and all(
        isinstance(s, Sequence)
        and len(s) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
        for s in segments
    ):
        pairs = [list(s) for s in segments]
    if pairs is None:
        raise InputError(
            f"segments is {segments!r:.80}; pass [segment, 2] integer (start, end) key ranges, "
            f"end exclusive, e.g. [(0, 4), (4, {n_pos})]"
        )
    for a, b in pairs:
        if a < 0 or b > n_pos or a >= b:
            raise InputError(
                f"segment ({a}, {b}) is outside the sequence of {n_pos} tokens; pass "
                f"0 <= start < end <= {n_pos} (end exclusive)"
            )
    return torch.tensor(pairs, dtype=torch.int64, device=device).reshape(-1, 2)


def check(
    q: Tensor,
    k: Tensor,
    scale: object,
    lengths: object,
    queries: object,
    top_k: object,
    segments: object,
    block: object,
) -> tuple[Tensor, Tensor, Tensor]:
    """Raise :class:`InputError` naming the problem and the fix unless the inputs fit.

    Returns:
        ``(lengths [batch], queries [batch, selected], segments [segment, 2])``, int64 on
        ``q.device``, negative queries resolved per row.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise InputError(
                f"{name} must be a 4-D tensor [batch, {'kv_' if name == 'k' else ''}head, pos, "
                f"d_head], got {getattr(t, 'shape', type(t))}; transpose "
                f"[batch, pos, head, d_head] with .transpose(1, 2)"
            )
        if t.dtype not in _FLOATS:
            raise InputError(
                f"{name} is {t.dtype}; pass float queries and keys (fp32, fp16 or bf16)"
            )
    if k.dtype != q.dtype or k.device != q.device:
        raise InputError(
            f"q is {q.dtype} on {q.device} but k is {k.dtype} on {k.device}; pass both in one "
            f"dtype on one device (k.to(q))"
        )
    (n_batch, n_head, n_pos, d), (kb, n_kv, kt, kd) = q.shape, k.shape
    if (kb, kt, kd) != (n_batch, n_pos, d):
        raise InputError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, pos or d_head; pass "
            f"the same layer's rotated queries and keys, both [batch, (kv_)head, pos, d_head]"
        )
    if n_kv == 0 or n_head % n_kv != 0:
        raise InputError(
            f"q has {n_head} heads but k has {n_kv} key heads, and {n_head} % {n_kv} != 0; "
            f"pass k with a number of heads that divides q's (grouped-query attention)"
        )
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not (math.isfinite(scale) and scale > 0)
    ):
        raise InputError(
            f"scale is {scale!r}; pass the layer's softmax scale, a positive finite float "
            f"(usually 1 / sqrt(d_head))"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_pos:
        raise InputError(
            f"top_k is {top_k!r} but the sequence has {n_pos} keys; pass an int in 1..{n_pos}"
        )
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise InputError(f"block is {block!r}; pass a positive int (query rows per block) or None")
    for name, t in (("q", q), ("k", k)):
        if not bool(torch.isfinite(t).all()):
            raise InputError(
                f"{name} holds NaN or inf; check the forward that produced it (fp16 overflow: "
                f"run the model in bf16 or fp32)"
            )
    lens = check_lengths(lengths, n_batch, n_pos, q.device)
    return lens, resolve_queries(queries, lens), resolve_segments(segments, n_pos, q.device)


def attention_stats(
    q: Float[Tensor, "batch head pos d_head"],
    k: Float[Tensor, "batch kv_head pos d_head"],
    *,
    scale: float,
    lengths: Int[Tensor, " batch"] | None = None,
    causal: bool = True,
    queries: Queries = None,
    top_k: int = 1,
    segments: Segments = None,
    block: int | None = None,
) -> AttnStats:
    """Row and key statistics of ``softmax(scale * q k^T + mask)`` in O(block * T) memory.

    Args:
        q: ``[batch, head, pos, d_head]`` rotated queries of one layer (fp32, fp16 or bf16;
            fp64 is accepted and scored in fp32).
        k: ``[batch, kv_head, pos, d_head]`` rotated keys, same dtype and device; ``head`` must
            be a multiple of ``kv_head`` (query head ``h`` reads key head ``h // group``).
        scale: the softmax scale, a positive float (usually ``1 / sqrt(d_head)``).
        lengths: ``[batch]`` integer real tokens per row (right padding), ``1..pos``; ``None``:
            every row is ``pos`` long.
        causal: mask key ``j`` for query ``i < j``.
        queries: the selected query rows for ``argmax``/``top_*``: ``[selected]`` positions
            (the same for every row) or ``[batch, selected]``; negative counts from each row's
            end (``-1``: the last real token of each row). Each must be a real token. ``None``:
            no rows selected (those outputs have ``selected = 0``).
        top_k: keys kept per selected row, ``1..pos``; slots past the keys a row can see hold
            index ``-1`` and weight ``0``.
        segments: ``[segment, 2]`` ``(start, end)`` key ranges, end exclusive, the same for every
            row (a list of pairs or an int tensor); ``None``: ``segment = 0``.
        block: query rows per block (reference) or the tile side (Triton, rounded up to a power
            of two, 16..128); ``None``: at most 32 MiB of scores per block (reference), 64 x 64
            tiles (Triton).

    Returns:
        :class:`AttnStats` (floats fp32, indices int64); ``lse = -inf``, ``entropy = 0`` and
        ``segment_mass = 0`` for padded queries.

    Raises:
        InputError: non-float or NaN/inf inputs; q and k that disagree on dtype, device, batch,
            pos or d_head, or whose head counts do not divide; a bad scale, top_k or block;
            lengths outside ``1..pos``; a selected query that is not a real token of its row; a
            segment outside the sequence.

    >>> import torch
    >>> q = torch.zeros(1, 2, 3, 4)  # zero queries: uniform attention over the visible keys
    >>> k = torch.randn(1, 1, 3, 4)  # one key head shared by both query heads
    >>> st = attention_stats(q, k, scale=0.5, queries=[-1], top_k=2, segments=[(0, 1), (1, 3)])
    >>> st.received[0, 0]  # key j is seen by 3 - j queries with weights 1/(i+1)
    tensor([1.8333, 0.8333, 0.3333])
    >>> st.segment_mass[0, 0, -1], st.entropy[0, 0, -1]  # last row: 1/3 on key 0; log 3 nats
    (tensor([0.3333, 0.6667]), tensor(1.0986))
    >>> st.top_weight[0, 0, 0]
    tensor([0.3333, 0.3333])
    """
    lens, sel, seg = check(q, k, scale, lengths, queries, top_k, segments, block)
    with torch.no_grad():
        if _dispatch.choose(q, k) == "triton":
            from mechscope.kernels.attn_stats import triton as kernel

            return kernel.attention_stats(q, k, float(scale), lens, causal, sel, top_k, seg, block)
        return reference.attention_stats(q, k, float(scale), lens, causal, sel, top_k, seg, block)


def act_mean(
    received: Float[Tensor, "batch head key"],
    lengths: Int[Tensor, " batch"] | None = None,
    *,
    causal: bool = True,
) -> Float[Tensor, "batch head key"]:
    """The ACT key score: the mean attention key ``j`` receives from the real queries that see it.

    ``received[..., j] / n_j`` with ``n_j = L - j`` (causal: queries ``j..L-1``) or ``n_j = L``,
    ``L = lengths[b]``; ``0`` on padded keys ``j >= L``.

    Args:
        received: ``[batch, head, key]`` from :func:`attention_stats` or
            :func:`stats_from_pattern`.
        lengths: ``[batch]`` integer real tokens per row; ``None``: every row is ``key`` long.
        causal: whether the attention was causal.

    >>> act_mean(torch.tensor([[[1.5, 0.5]]]))  # key 0 seen by 2 queries, key 1 by one
    tensor([[[0.7500, 0.5000]]])
    """
    n_batch, _, n_pos = received.shape
    lens = check_lengths(lengths, n_batch, n_pos, received.device)
    keys = torch.arange(n_pos, device=received.device)
    seen_by = (lens[:, None] - keys) if causal else lens[:, None].expand(n_batch, n_pos)
    real = keys < lens[:, None]  # [batch, key]
    n = torch.where(real, seen_by, 1).to(torch.float32)[:, None, :]
    return torch.where(real[:, None, :], received.float() / n, 0.0)


def stats_from_pattern(
    pattern: Float[Tensor, "batch head query key"],
    *,
    lengths: Int[Tensor, " batch"] | None = None,
    queries: Queries = None,
    top_k: int = 1,
    segments: Segments = None,
) -> AttnStats:
    """The statistics of :func:`attention_stats` read from a materialised pattern (the oracle).

    Args:
        pattern: ``[batch, head, query, key]`` attention weights, already softmaxed and masked
            (e.g. a bridge's ``hook_pattern``), ``query == key``.
        lengths, queries, top_k, segments: as in :func:`attention_stats`.

    Returns:
        :class:`AttnStats` with ``lse`` all ``NaN`` (a pattern has no scores); computed in fp64
        for an fp64 pattern, else fp32, returned in fp32. Padded queries are dropped; the pattern
        is otherwise read as is. Keys of weight exactly 0 count as unseen in the top-k.

    >>> p = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    >>> st = stats_from_pattern(p, queries=[-1], top_k=2, segments=[(1, 2)])
    >>> st.received, st.top_idx
    (tensor([[[1.2500, 0.7500]]]), tensor([[[[1, 0]]]]))
    """
    if pattern.ndim != 4 or pattern.shape[2] != pattern.shape[3]:
        raise InputError(
            f"pattern has shape {tuple(pattern.shape)}; pass a softmaxed [batch, head, query, key] "
            f"self-attention pattern with query == key"
        )
    if pattern.dtype not in _FLOATS:
        raise InputError(f"pattern is {pattern.dtype}; pass float attention weights")
    n_batch, _, n_pos, _ = pattern.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_pos:
        raise InputError(
            f"top_k is {top_k!r} but the sequence has {n_pos} keys; pass an int in 1..{n_pos}"
        )
    lens = check_lengths(lengths, n_batch, n_pos, pattern.device)
    sel = resolve_queries(queries, lens)
    seg = resolve_segments(segments, n_pos, pattern.device)
    with torch.no_grad():
        return reference.stats_from_pattern(pattern, lens, sel, top_k, seg)
