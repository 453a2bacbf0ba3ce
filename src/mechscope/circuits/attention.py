"""Interventions on attention patterns, shared by the head analyses.

Each function returns :class:`~mechscope.probes.Apply` interventions on the ``patterns`` site
(``blocks.l.attn.hook_pattern``, ``[batch, head, query, key]``), grouped by layer, so they run
through :func:`~mechscope.probes.intervene` like any other change to the forward pass. The causal
mask is taken with the query/key offset ``key - query`` (a query block shorter than the key axis
is the *last* queries), and padded keys are never given attention: a pattern entry that is exactly
0 on a visible key stays a candidate, but keys a query cannot see get 0.

- :func:`uniform_attention`: each selected head attends uniformly to the keys its query can see
  (the "masking" ablation of retrieval heads, Wu et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from mechscope.probes.interventions import Apply, Intervention

Heads = Iterable[tuple[int, int]]


def causal_mask(pattern: Tensor) -> Tensor:
    """``[query, key]`` bool: which keys each query row of ``pattern`` can see (the queries are
    the last ``query`` positions of a ``key``-long sequence).

    >>> causal_mask(torch.zeros(1, 1, 2, 3)).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    """
    q, k = pattern.shape[-2:]
    return torch.ones(q, k, dtype=torch.bool, device=pattern.device).tril(k - q)


def _uniform(pattern: Tensor) -> Tensor:  # [batch, head, query, key]
    causal = causal_mask(pattern).to(pattern.dtype)
    return (causal / causal.sum(-1, keepdim=True)).expand_as(pattern)


def by_layer(heads: Heads) -> dict[int, tuple[int, ...]]:
    """``(layer, head)`` pairs grouped by layer, layers and heads sorted.

    >>> by_layer([(1, 2), (0, 3), (1, 0)])
    {0: (3,), 1: (0, 2)}
    """
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return {layer: tuple(sorted(set(hs))) for layer, hs in sorted(out.items())}


def pattern_interventions(heads: Heads, fn: Callable[[Tensor], Tensor],
                          positions: Tensor | None = None) -> list[Intervention]:  # fmt: skip
    """One :class:`~mechscope.probes.Apply` per layer writing ``fn(pattern)`` on ``heads``."""
    return [Apply(site="patterns", layer=layer, heads=hs, positions=positions, fn=fn)
            for layer, hs in by_layer(heads).items()]  # fmt: skip


def uniform_attention(heads: Heads, positions: Tensor | None = None) -> list[Intervention]:
    """Interventions that make each head's attention uniform over the keys each query can see.

    Args:
        heads: ``(layer, head)`` pairs.
        positions: query positions ``[batch, n_pos]`` to ablate (None: every query).

    >>> [(s.layer, s.heads) for s in uniform_attention([(1, 0), (1, 2), (0, 3)])]
    [(0, (3,)), (1, (0, 2))]
    """
    return pattern_interventions(heads, _uniform, positions)


__all__ = ["by_layer", "causal_mask", "pattern_interventions", "uniform_attention"]
