"""Segment attention: how much of each head's attention lands on a context segment.

The attention-mass side of head divergence (:mod:`mechscope.circuits.divergence`): VHD says how
much a head's *output* changes when the segment goes; this says how much the head *looks* at it.
For a prompt of ``L`` tokens whose segment is the token span ``[start, end)`` and a head's
pattern ``A [query, key]``:

- ``mass = mean_{i in [end, L)} sum_{j in [start, end)} A[i, j]``: the mean over the queries
  after the segment (every query that can see all of it) of the attention on its keys;
- ``last_mass = sum_{j in [start, end)} A[L - 1, j]``: the same from the last query alone.

Both are averaged over prompts (each prompt's own span: a text segment is found in each prompt).
Attention is read through :func:`~mechscope.circuits.attn_path.layer_stats`, so long prompts take
the **statistics path** (no ``[query, key]`` tensor is materialised) when their patterns would
exceed the memory budget; the result's ``attention_path`` says which path ran and why.

>>> from mechscope.models import load
>>> m = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=16")
>>> sa = segment_attention(m, torch.tensor([[1, 2, 3, 4, 5, 6]]), (1, 3), progress=False)
>>> tuple(sa.mass.shape), sa.spans, sa.attention_path["path"]
((2, 2), [(1, 3)], 'patterns')
>>> bool(((sa.mass >= 0) & (sa.mass <= 1 + 1e-6)).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.circuits.attn_path import choose_path, layer_stats
from mechscope.circuits.divergence import Injected, _span
from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap
from mechscope.probes.tokens import Prompts, tokenize
from mechscope.results import Provenance, Result
from mechscope.types import Model

__all__ = ["SegmentAttention", "segment_attention"]

Span = tuple[int, int]
Head = tuple[int, int]
SegmentSpec = str | Span | Sequence[int] | Sequence[str] | Sequence[Span]


@dataclass(frozen=True, kw_only=True, eq=False)
class SegmentAttention(Result):
    """Attention of every head on a context segment (module docstring).

    Attributes:
        mass: ``[layer, head]`` mean over prompts of the mean attention mass on the segment's keys
            over the queries after the segment.
        last_mass: ``[layer, head]`` the same from each prompt's last query.
        prompt_mass, prompt_last_mass: ``[prompt, layer, head]`` per prompt (input order).
        spans: each prompt's segment ``(start, end)``, end exclusive; ``lengths``: its tokens.
        attention_path: ``{"path": "patterns" | "stats", "why": ...}``
            (:meth:`~mechscope.circuits.attn_path.PathChoice.as_dict`).
    """

    kind = "segment_attention"
    mass: Float[Tensor, "layer head"]
    last_mass: Float[Tensor, "layer head"]
    prompt_mass: Float[Tensor, "prompt layer head"]
    prompt_last_mass: Float[Tensor, "prompt layer head"]
    spans: list[tuple[int, int]]
    lengths: list[int]
    attention_path: dict[str, str] = field(default_factory=dict)

    def _scores(self, by: str) -> Tensor:
        if by == "mass":
            return self.mass
        if by == "last":
            return self.last_mass
        raise InputError(f"unknown score {by!r}; choose 'mass' (queries after the segment) or "
                         "'last' (the last query)")  # fmt: skip

    def top(self, k: int | None = None, *, by: Literal["mass", "last"] = "mass") -> list[Head]:
        """The ``k`` heads (default: all) of largest ``mass`` (``by="last"``: ``last_mass``),
        best first; ties keep (layer, head) order."""
        scores = self._scores(by)
        flat, n_heads = scores.reshape(-1), int(scores.shape[1])
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InputError(f"k must be a positive number of heads, got {k!r}")
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        return [(int(i) // n_heads, int(i) % n_heads) for i in order]

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, head, mass, last_mass, mass_std`` (std over prompts; 0 for one)."""
        n_layers, n_heads = self.mass.shape
        pm = self.prompt_mass.double()
        std = pm.std(0) if pm.shape[0] > 1 else torch.zeros_like(pm[0])
        return pd.DataFrame({
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "mass": self.mass.double().reshape(-1).numpy(),
            "last_mass": self.last_mass.double().reshape(-1).numpy(),
            "mass_std": std.reshape(-1).numpy(),
        })  # fmt: skip

    def figure(self, view: Literal["mass", "last"] = "mass") -> go.Figure:
        """Layer x head heatmap of ``mass`` (``view="last"``: ``last_mass``)."""
        what = "queries after the segment" if view == "mass" else "the last query"
        return layer_head_heatmap(self._scores(view).numpy(), colorscale="Viridis",
                                  title=f"attention on the segment ({what}; "
                                        f"{self.attention_path.get('path', '?')} path)")  # fmt: skip

    def payload(self) -> dict[str, Any]:
        """JSON body: ``scores`` (``mass``), ``last_mass``, ``heads`` (the top ``n_heads`` by
        mass), ``spans``, ``lengths``, ``attention_path``."""
        return {"scores": self.mass.tolist(), "last_mass": self.last_mass.tolist(),
                "heads": [list(h) for h in self.top(int(self.mass.shape[1]))],
                "spans": [list(s) for s in self.spans], "lengths": list(self.lengths),
                "attention_path": dict(self.attention_path)}  # fmt: skip


def _is_span(x: Any) -> bool:
    return (isinstance(x, tuple | list) and len(x) == 2
            and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in x))  # fmt: skip


def _segments(segment: Any, n: int) -> list[Any]:
    """One segment per prompt (spans as ``(int, int)`` tuples): a list of texts/spans is per
    prompt; text or one span is shared."""
    if isinstance(segment, Injected):
        raise InputError("segment_attention reads the attention of the prompt's own tokens; an "
                         "Injected block is not supported: pass its (start, end) span")  # fmt: skip
    if isinstance(segment, list) and not _is_span(segment):
        if len(segment) != n:
            raise InputError(f"{len(segment)} segments for {n} prompts; give one per prompt, or "
                             "one (start, end) tuple or text for all")  # fmt: skip
        segs = list(segment)
    else:
        segs = [segment] * n
    return [(int(s[0]), int(s[1])) if _is_span(s) else s for s in segs]


def segment_attention(model: Model, prompts: Prompts, segment: SegmentSpec, *,
                      path: str = "auto", progress: bool = True) -> SegmentAttention:  # fmt: skip
    """How much attention every head puts on ``segment`` of every prompt (module docstring).

    Args:
        prompts: text, token ids ``[batch, pos]`` (or a list of id lists) or a TaskBatch (its
            clean rows).
        segment: text (found in each prompt: the tokens it touches), a ``(start, end)`` token
            span (end exclusive, used as given), or a list with one of those per prompt.
        path: ``"auto"`` (the statistics path when the patterns would exceed the memory budget),
            ``"patterns"`` or ``"stats"`` (:func:`~mechscope.circuits.attn_path.choose_path`).

    Returns:
        :class:`SegmentAttention` with ``mass``/``last_mass`` ``[layer, head]``.

    Raises:
        InputError: an unknown ``path``; a segment not in a prompt (the span and the prompt's
            length are named) or empty; a segment that ends at a prompt's last token (no query
            after it); a list of segments whose length is not the number of prompts.
    """
    tokens, lengths = tokenize(model, prompts)
    choice = choose_path(model, lengths, path)
    n_prompts = int(tokens.shape[0])
    spans: list[Span] = []
    for i, seg in enumerate(_segments(segment, n_prompts)):
        n = int(lengths[i])
        span = _span(model, tokens[i, :n], seg)
        if span[1] >= n:
            raise InputError(f"segment {span} of prompt {i} ends at its last token ({n} tokens): "
                             "no query comes after it to attend to it; end the segment before "
                             "the last token, or add the question after it")  # fmt: skip
        spans.append(span)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    mass = torch.zeros(n_prompts, n_layers, n_heads)
    last = torch.zeros(n_prompts, n_layers, n_heads)
    groups: dict[Span, list[int]] = {}
    for i, span in enumerate(spans):
        groups.setdefault(span, []).append(i)
    for span, members in groups.items():
        idx = torch.tensor(members)
        idx = idx[lengths[idx].argsort(descending=True, stable=True)]  # batch similar lengths
        g_tokens, g_lengths = tokens[idx], lengths[idx]
        width = int(g_lengths.max())
        for ls in layer_stats(model, g_tokens[:, :width], g_lengths, choice, segments=[span],
                              progress=progress, desc="segment attention"):  # fmt: skip
            seg_mass = ls.stats.segment_mass[..., 0].float().cpu()  # [rows, head, query]
            for b, r in enumerate(ls.rows.tolist()):
                row, n = int(idx[r]), int(ls.lengths[b])
                mass[row, ls.layer] = seg_mass[b, :, span[1] : n].mean(-1)
                last[row, ls.layer] = seg_mass[b, :, n - 1]
    config = {"segment": segment if isinstance(segment, str) else None,
              "spans": [list(s) for s in spans], "path": path, "n_prompts": n_prompts}  # fmt: skip
    return SegmentAttention(
        provenance=Provenance.of(model, config), mass=mass.mean(0), last_mass=last.mean(0),
        prompt_mass=mass, prompt_last_mass=last, spans=spans,
        lengths=[int(x) for x in lengths.tolist()], attention_path=choice.as_dict())  # fmt: skip
