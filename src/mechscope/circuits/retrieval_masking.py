"""Masking validation of retrieval heads (Wu et al. 2024; METHODS.md section 3): needle accuracy
with the top-K retrieval heads' attention made uniform, against K random other heads."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from mechscope.circuits.attention import uniform_attention
from mechscope.circuits.retrieval import RetrievalScores, _check_model
from mechscope.errors import InputError
from mechscope.probes import intervene
from mechscope.results import Provenance, Result
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model

__all__ = ["MaskingResult", "masking_validation"]


@dataclass(frozen=True, kw_only=True, eq=False)
class MaskingResult(Result):
    """Needle accuracy (top-1 at ``answer_pos``: the first needle token the model must produce)
    with the top-K retrieval heads' attention made uniform at every query, vs K random other
    heads (several draws), vs no masking."""

    k: int
    top_heads: list[tuple[int, int]]
    random_heads: list[list[tuple[int, int]]]
    baseline: float
    top_accuracy: float
    random_accuracy: list[float]
    scores: Tensor
    metric: str = "top-1 accuracy at answer_pos"

    def to_frame(self) -> pd.DataFrame:
        conds = [("baseline", self.baseline, []), (f"top-{self.k}", self.top_accuracy, self.top_heads)]
        conds += [(f"random-{self.k} #{i}", a, hs) for i, (a, hs)
                  in enumerate(zip(self.random_accuracy, self.random_heads, strict=True))]  # fmt: skip
        return pd.DataFrame([{"condition": c, "accuracy": a, "heads": str([list(h) for h in hs])}
                             for c, a, hs in conds])  # fmt: skip

    def figure(self) -> go.Figure:
        f = self.to_frame()
        fig = go.Figure(go.Bar(x=f["condition"], y=f["accuracy"]))
        fig.update_layout(title=f"needle accuracy with K={self.k} heads' attention uniform",
                          yaxis_title=self.metric, yaxis_range=[0, 1])  # fmt: skip
        return fig

    def payload(self) -> dict[str, Any]:
        return {"scores": self.scores.tolist(), "heads": [list(h) for h in self.top_heads],
                "k": self.k, "baseline": self.baseline, "top_accuracy": self.top_accuracy,
                "random_accuracy": list(self.random_accuracy),
                "random_heads": [[list(h) for h in hs] for hs in self.random_heads]}  # fmt: skip


def _accuracy(model: Model, batches: Sequence[TaskBatch], heads: Sequence[tuple[int, int]]) -> float:
    right = total = 0.0
    device = next(model.parameters()).device
    for b in batches:
        with torch.no_grad(), intervene(model, uniform_attention(heads)):
            logits = model(b.clean.to(device))
        right += b.accuracy(logits.cpu()) * b.batch_size
        total += b.batch_size
    return right / total


def masking_validation(model: Model, batches: TaskBatch | Sequence[TaskBatch],
                       scores: RetrievalScores | Tensor, *, k: int, n_random: int = 3,
                       seed: int = 0) -> MaskingResult:  # fmt: skip
    """Mask (uniform attention at every query) the ``k`` top-scoring heads, and ``k`` random
    heads drawn from the others (from all heads when fewer than ``k`` others), ``n_random``
    draws; report needle accuracy (top-1 at ``answer_pos``) of each and of the intact model."""
    _check_model(model)
    blist = [batches] if isinstance(batches, TaskBatch) else list(batches)
    if not blist:
        raise InputError("no batches given for masking validation")
    grid = scores.scores if isinstance(scores, RetrievalScores) else torch.as_tensor(scores)
    grid = grid.float()
    shape = (int(model.cfg.n_layers), int(model.cfg.n_heads))
    if tuple(grid.shape) != shape:
        raise InputError(f"scores must be [layer, head] = {shape}, got {tuple(grid.shape)}")
    n = grid.numel()
    if not isinstance(k, int) or not 1 <= k <= n:
        raise InputError(f"k={k} heads: choose 1 <= k <= {n} (the model has {n} heads)")
    order = torch.argsort(-grid.flatten(), stable=True).tolist()
    as_head = [(i // shape[1], i % shape[1]) for i in range(n)]
    top = [as_head[i] for i in order[:k]]
    others = [as_head[i] for i in order[k:]] if n - k >= k else as_head
    rng = random.Random(seed)  # draws: sorted heads, k each
    draws = [sorted(rng.sample(others, k)) for _ in range(n_random)]
    return MaskingResult(provenance=Provenance.of(model, {"k": k, "n_random": n_random}, seed=seed),
                         k=k, top_heads=top, random_heads=draws, baseline=_accuracy(model, blist, []),
                         top_accuracy=_accuracy(model, blist, top),
                         random_accuracy=[_accuracy(model, blist, d) for d in draws], scores=grid)  # fmt: skip
