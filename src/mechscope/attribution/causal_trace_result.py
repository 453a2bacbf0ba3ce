"""Results of causal tracing (:func:`mechscope.attribution.causal_trace`) and their average.

:class:`CausalTraceResult` holds one prompt's ``[layer, pos]`` grid of ``p(target)`` with the
clean value restored (``scores``), its indirect effect ``scores - p_corrupt`` and the run's
settings. :func:`aggregate_traces` averages indirect effects over prompts by position bucket, as
ROME reports them (Meng et al. 2022, fig. 2): first / middle / last subject token, first
subsequent token, further tokens, last token. A position can fall in two buckets (a one-token
subject is its first and last token; a first subsequent token that is also the last token counts
for both); a prompt without a bucket (no middle subject tokens) does not count towards it.

>>> import torch
>>> from mechscope.results import Provenance
>>> r = CausalTraceResult(provenance=Provenance.of(None), scores=torch.tensor([[0.1, 0.5, 0.2]]),
...                       tokens=("a", "b", "c"), subject=(1, 2), target=3, p_clean=0.9,
...                       p_corrupt=0.1, trace_kind="hidden")
>>> r.to_frame()["token"].tolist()
['a', 'b*', 'c']
>>> [round(x, 3) for x in aggregate_traces([r]).scores[:, 0].tolist()]  # no middle, no further
[0.4, nan, 0.4, 0.1, nan, 0.1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.figures import token_layer_heatmap
from mechscope.results import Provenance, Result

BUCKETS = ("first subject token", "middle subject tokens", "last subject token",
           "first subsequent token", "further tokens", "last token")  # fmt: skip
_COLORS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


@dataclass(frozen=True, kw_only=True, eq=False)
class CausalTraceResult(Result):
    """One prompt's causal trace.

    Attributes:
        scores: ``[layer, pos]`` mean ``p(target)`` over the noisy rows with the clean value
            restored at (layer, pos) (a window of layers for ``mlp``/``attn``).
        tokens: token labels; token_ids: the prompt's ids.
        subject: ``(start, end)`` token span of the subject (end exclusive).
        target: the answer id; target_token: its label.
        p_clean, p_corrupt: ``p(target)`` of the clean run and (mean) of the noisy rows.
        trace_kind: ``hidden``, ``mlp`` or ``attn`` (``kind`` is the store's run kind).
        window, samples, noise, sigma, severed: the settings (``nu = noise * sigma``).
        n_skipped: restores that were exact no-ops (score = ``p_corrupt``); work: counts.
    """

    kind = "causal_trace"
    scores: Float[Tensor, "layer pos"]
    tokens: Sequence[str]
    subject: tuple[int, int]
    target: int
    p_clean: float
    p_corrupt: float
    trace_kind: str
    token_ids: tuple[int, ...] = ()
    target_token: str = ""
    window: int = 10
    samples: int = 10
    noise: float = 3.0
    sigma: float = math.nan
    severed: str | None = None
    n_skipped: int = 0
    work: Mapping[str, int | float | str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "subject", tuple(self.subject))
        if self.scores.ndim != 2 or self.scores.shape[1] != len(self.tokens):
            raise InputError(f"scores of shape {tuple(self.scores.shape)} need [layer, pos] with "
                             f"one position per token ({len(self.tokens)})")  # fmt: skip

    @property
    def indirect_effect(self) -> Float[Tensor, "layer pos"]:
        """``p_patched - p_corrupt`` per (layer, pos)."""
        return self.scores - self.p_corrupt

    @property
    def total_effect(self) -> float:
        """``p_clean - p_corrupt``."""
        return self.p_clean - self.p_corrupt

    def labels(self) -> tuple[str, ...]:
        """Token labels with the subject tokens marked by a trailing ``*``."""
        s, e = self.subject
        return tuple(f"{t}*" if s <= i < e else t for i, t in enumerate(self.tokens))

    def argmax(self) -> tuple[int, int]:
        """``(layer, pos)`` of the largest indirect effect."""
        flat = int(self.scores.argmax())
        return flat // self.scores.shape[1], flat % self.scores.shape[1]

    def to_frame(self) -> pd.DataFrame:
        n_layers, n_pos = self.scores.shape
        labels = self.labels()
        s, e = self.subject
        rows = [{"layer": ly, "pos": p, "token": labels[p], "subject": s <= p < e,
                 "p": float(self.scores[ly, p]), "indirect_effect": float(self.scores[ly, p]) - self.p_corrupt}
                for ly in range(n_layers) for p in range(n_pos)]  # fmt: skip
        return pd.DataFrame(rows, columns=["layer", "pos", "token", "subject", "p", "indirect_effect"])

    def figure(self) -> go.Figure:
        what = {"hidden": "hidden state", "mlp": "MLP", "attn": "attention"}.get(self.trace_kind, self.trace_kind)
        sev = f", {self.severed} severed" if self.severed else ""
        title = (f"p({self.target_token or self.target}) restoring {what}{sev}: clean "
                 f"{self.p_clean:.3g}, corrupt {self.p_corrupt:.3g}")  # fmt: skip
        return token_layer_heatmap(self.scores, self.labels(), title=title,
                                   colorscale=_COLORS.get(self.trace_kind, "Purples"))  # fmt: skip


def buckets(subject: tuple[int, int], n_pos: int) -> list[list[int]]:
    """Positions of each of :data:`BUCKETS` for a subject span in a prompt of ``n_pos`` tokens.

    >>> buckets((1, 4), 7)
    [[1], [2], [3], [4], [5], [6]]
    """
    s, e = subject
    last = n_pos - 1
    return [[s], list(range(s + 1, e - 1)), [e - 1], [e] if e <= last else [],
            list(range(e + 1, last)), [last]]  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class AggregateTrace(Result):
    """Average indirect effect by position bucket x layer over several traces.

    Attributes:
        scores: ``[bucket, layer]`` mean indirect effect (NaN where no prompt has the bucket).
        buckets: the bucket names (:data:`BUCKETS`); counts: prompts contributing to each.
        trace_kind: ``hidden``, ``mlp`` or ``attn``; n_prompts; total_effect: mean TE.
    """

    kind = "causal_trace_aggregate"
    scores: Float[Tensor, "bucket layer"]
    buckets: tuple[str, ...]
    counts: tuple[int, ...]
    trace_kind: str
    n_prompts: int
    total_effect: float

    def to_frame(self) -> pd.DataFrame:
        rows = [{"bucket": b, "layer": ly, "indirect_effect": float(self.scores[i, ly]),
                 "prompts": self.counts[i]}
                for i, b in enumerate(self.buckets) for ly in range(self.scores.shape[1])]  # fmt: skip
        return pd.DataFrame(rows, columns=["bucket", "layer", "indirect_effect", "prompts"])

    def figure(self) -> go.Figure:
        return token_layer_heatmap(self.scores.T, self.buckets, colorscale=_COLORS.get(self.trace_kind, "Purples"),
                                   title=f"average indirect effect ({self.trace_kind}, {self.n_prompts} prompts)")


def aggregate_traces(results: Sequence[CausalTraceResult]) -> AggregateTrace:
    """Average the indirect effects of several traces by position bucket (ROME's figure 2).

    Raises:
        InputError: no results, or results of different kinds or layer counts.
    """
    results = list(results)
    if not results:
        raise InputError("aggregate_traces needs at least one CausalTraceResult")
    kinds = {(r.trace_kind, r.severed, int(r.scores.shape[0])) for r in results}
    if len(kinds) != 1:
        raise InputError(f"traces differ in (kind, severed, layers): {sorted(kinds, key=str)}; "
                         "aggregate traces of one kind on one model")  # fmt: skip
    n_layers = int(results[0].scores.shape[0])
    total = torch.zeros(len(BUCKETS), n_layers, dtype=torch.float64)
    counts = [0] * len(BUCKETS)
    for r in results:
        ie = r.indirect_effect.double()
        for i, pos in enumerate(buckets(r.subject, ie.shape[1])):
            if pos:
                total[i] += ie[:, pos].mean(1)
                counts[i] += 1
    denom = torch.tensor([c if c else math.nan for c in counts], dtype=torch.float64)[:, None]
    return AggregateTrace(
        provenance=Provenance.of(None, {"kind": results[0].trace_kind, "n": len(results)}),
        scores=(total / denom).float(), buckets=BUCKETS, counts=tuple(counts),
        trace_kind=results[0].trace_kind, n_prompts=len(results),
        total_effect=sum(r.total_effect for r in results) / len(results),
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class CausalTraceSweep(Result):
    """Causal traces of many facts (:func:`mechscope.attribution.causal_traces`) and their
    average by position bucket.

    Attributes:
        traces: one :class:`CausalTraceResult` per fact, in the facts' order.
        aggregate: :func:`aggregate_traces` of them.
    """

    kind = "causal_trace_sweep"
    traces: tuple[CausalTraceResult, ...]
    aggregate: AggregateTrace

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "traces", tuple(self.traces))

    def to_frame(self) -> pd.DataFrame:
        """One row per fact: its prompt, subject span, target, clean/corrupt p, total effect and
        the (layer, position) of its largest indirect effect."""
        rows = []
        for i, r in enumerate(self.traces):
            layer, pos = r.argmax()
            rows.append({"fact": i, "prompt": "".join(r.tokens), "subject": f"{r.subject[0]}:{r.subject[1]}",
                         "target": r.target_token or str(r.target), "p_clean": r.p_clean,
                         "p_corrupt": r.p_corrupt, "total_effect": r.total_effect,
                         "peak_layer": layer, "peak_pos": pos,
                         "peak_indirect_effect": float(r.indirect_effect[layer, pos])})  # fmt: skip
        return pd.DataFrame(rows)

    def figure(self) -> go.Figure:
        return self.aggregate.figure()
