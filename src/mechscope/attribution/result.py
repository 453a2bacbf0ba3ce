"""The result of an activation-patching sweep (:func:`mechscope.attribution.patch_sweep`).

A :class:`PatchResult` holds the score grid (``[layer, pos]``, ``[layer, pos, head]``,
``[layer, head]`` or ``[layer]``), the token labels, the metric of the clean and corrupt runs, how
many patches were skipped as exact no-ops and the work the sweep did.

>>> import torch
>>> from mechscope.results import Provenance
>>> r = PatchResult(provenance=Provenance.of(None), scores=torch.tensor([[0.0, 1.0]]),
...                 axes=("layer", "pos"), tokens=("a", "b"), site="resid_pre",
...                 direction="denoise", metric="normalised logit difference", normalised=True,
...                 metric_clean=2.0, metric_corrupt=-1.0, n_patches=2, n_skipped=1)
>>> r.to_frame().columns.tolist()
['layer', 'pos', 'token', 'score']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap, token_layer_heatmap
from mechscope.results import Result

_AXES = {("layer", "pos"), ("layer", "pos", "head"), ("layer", "head"), ("layer",)}


@dataclass(frozen=True, kw_only=True, eq=False)
class PatchResult(Result):
    """Patching effects of one sweep.

    Attributes:
        scores: one score per patch, laid out by ``axes``.
        axes: ``("layer", "pos")``, ``("layer", "pos", "head")``, ``("layer", "head")`` or
            ``("layer",)``.
        tokens: the clean prompt's tokens (first row), one per position.
        site, direction: what was patched, and which way (``denoise``: clean into corrupt).
        metric: what the score measures; ``normalised``: whether it is the normalised effect
            (0 = the unpatched run, 1 = the other run) or the raw metric of the patched run.
        metric_clean, metric_corrupt: the raw metric of the clean and the corrupt run.
        prob_clean, prob_corrupt: mean probability of the answer (None without a task).
        n_patches: patches in the grid; n_skipped: of those, exact no-ops not run (their score
            is the unpatched run's, exactly).
        work: counts of the work done (forwards, rows, FLOPs relative to one forward per patch).
        raw_scores: for normalised scores, the raw metric of each patched run (what a sharded
            sweep averages over its shards); None when ``scores`` are raw already.
    """

    kind = "patch_sweep"
    scores: Float[Tensor, "*axes"]
    axes: tuple[str, ...]
    tokens: Sequence[str]
    site: str
    direction: str
    metric: str
    normalised: bool
    metric_clean: float
    metric_corrupt: float
    n_patches: int
    n_skipped: int
    prob_clean: float | None = None
    prob_corrupt: float | None = None
    work: Mapping[str, int | float | str | None] = field(default_factory=dict)
    raw_scores: Float[Tensor, "*axes"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.axes not in _AXES or self.scores.ndim != len(self.axes):
            raise InputError(f"scores of shape {tuple(self.scores.shape)} do not match axes "
                             f"{self.axes}")  # fmt: skip
        if "pos" in self.axes and len(self.tokens) != self.scores.shape[1]:
            raise InputError(f"{len(self.tokens)} tokens for {self.scores.shape[1]} positions")

    def to_frame(self) -> pd.DataFrame:
        """One row per patch: the axes' indices (and ``token``), then ``score``."""
        shape = tuple(self.scores.shape)
        idx = np.indices(shape).reshape(len(shape), -1)
        frame = pd.DataFrame({name: idx[i] for i, name in enumerate(self.axes)})
        if "pos" in self.axes:
            frame["token"] = [self.tokens[p] for p in idx[1]]
        frame["score"] = self.scores.detach().to("cpu", torch.float64).reshape(-1).numpy()
        return frame

    def figure(self) -> go.Figure:
        """A heatmap: tokens x layers, layers x heads, or tokens x (layer, head) rows."""
        title = f"{self.site} {self.direction}: {self.metric}"
        z = self.scores.detach().float()
        if self.axes == ("layer", "pos"):
            return token_layer_heatmap(z, list(self.tokens), title=title, zmid=0.0)
        if self.axes == ("layer", "pos", "head"):
            rows = z.permute(0, 2, 1).reshape(-1, z.shape[1])  # row = layer * n_heads + head
            return token_layer_heatmap(rows, list(self.tokens), zmid=0.0,
                                       title=f"{title} (row = layer x {z.shape[2]} + head)")
        return layer_head_heatmap(z if z.ndim == 2 else z[:, None], title=title, zmid=0.0)


__all__ = ["PatchResult"]
