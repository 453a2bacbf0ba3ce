"""Evaluation harness for circuit discovery: score head rankings against a reference circuit.

A *method* ranks the heads (``[layer, head]``, higher = more likely in the circuit); the
*reference* says which heads are the circuit (a set) and how much each head matters (a continuous
effect). :func:`ranking_metrics` scores one ranking both ways:

- as a set: ROC-AUC against membership (:func:`~mechscope.models.zoo.groundtruth.concordance`
  with a boolean truth, ties counting one half), precision and recall among the ``k`` top heads
  with ``k`` = the circuit's size (heads tied at the cut share the remaining places, as
  :func:`~mechscope.models.zoo.groundtruth.recall_at_k`; with that ``k`` precision equals recall);
- as effects: Spearman rank correlation with ``|effect|`` (average ranks for ties, as
  :func:`~mechscope.attribution.rank_agreement`) and the concordance index (Harrell's C).

:func:`evaluate_methods` runs the methods on one model's task batch
(:func:`mechscope.circuits.sae.task_batch`), times each (wall time to its ``[layer, head]``
ranking) and returns a :class:`CircuitEvaluation` (a table, a figure, a store run, a JSON payload).
The reference is a zoo checkpoint's ground truth (exact head patching on the zoo's own patch
batches, circuit rule ``|effect| >= 0.2``) or, for any other model, exact head patching on the
evaluated batch; then the SAE's agreement with patching (Spearman, top-k overlap against the
chance level ``k/n``) is reported as well. Methods (:data:`METHODS`):

- ``sae``: node scores of :func:`mechscope.circuits.sae.sae_circuit`;
- ``patching``: exact head patching (:func:`~mechscope.attribution.patch_sweep`, heads, all
  positions), score ``max(|denoise|, |noise|)``, the effect the zoo truth thresholds;
- ``attribution``: attribution patching of the same cells, the same score;
- ``detector``: the head analysis that matches the task: for induction the larger of the
  induction and previous-token scores (:func:`~mechscope.circuits.head_stats.head_statistics`,
  query rows with a target only; the induction circuit is both kinds of head), the retrieval score (:func:`~mechscope.circuits.retrieval.retrieval_scores`) for
  retrieval; for other tasks it is skipped and the reason recorded.

Caveat: the zoo truth averages patching over its own patch batches, which for induction corrupt
the *first* copy (so previous-token heads show); a method run on another batch (another corruption,
other rows) can differ from the truth even when it is exact patching.

>>> m = ranking_metrics([[0.9, 0.1], [0.2, 0.8]], [[True, False], [False, True]],
...                     effect=[[0.5, 0.0], [0.1, 0.4]])
>>> m["roc_auc"], m["precision_at_k"], m["k"], round(m["spearman_effect"], 6)
(1.0, 1.0, 2, 1.0)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from mechscope.attribution.attrib_patch import attribution_patch, rank_agreement
from mechscope.attribution.patching import patch_sweep
from mechscope.errors import InputError
from mechscope.models.loading import spec_of
from mechscope.models.zoo.groundtruth import THRESHOLD, GroundTruth, concordance, recall_at_k
from mechscope.results import Provenance, Result
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model

if TYPE_CHECKING:
    from mechscope.circuits.sae import SAECircuit, SAEConfig

__all__ = ["METHODS", "METRICS", "CircuitEvaluation", "MethodScore", "evaluate_methods",
           "ranking_metrics", "sae_agreement", "top_k_overlap"]  # fmt: skip

#: Methods :func:`evaluate_methods` knows, in the order it runs them.
METHODS = ("sae", "patching", "attribution", "detector")
#: The metrics of :func:`ranking_metrics` (the figure's bars, the table's columns).
METRICS = ("roc_auc", "precision_at_k", "recall_at_k", "spearman_effect", "concordance_effect")
#: k of the SAE-vs-patching top-k overlap (those below the number of heads).
AGREEMENT_KS = (5, 10, 20)


# -- metrics ------------------------------------------------------------------------------------


def _grid(x: Any, what: str) -> np.ndarray:
    """A float64 ``[layer, head]`` array from a tensor, array or nested list."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise InputError(f"{what} must be [layer, head] (2-d), got shape {a.shape}")
    return a


def _members(members: Any, shape: tuple[int, ...]) -> np.ndarray:
    m = _grid(members, "members")
    if m.shape != shape:
        raise InputError(f"members has shape {m.shape} but scores {shape}; pass one bool per "
                         "head, [layer, head], for the same model")  # fmt: skip
    if not np.isin(m, (0.0, 1.0)).all():
        raise InputError("members must be booleans (or 0/1): True for the circuit's heads")
    if not m.any():
        raise InputError("the member set is empty, so there is no circuit to rank; pass at least "
                         "one True head (or a reference with a lower threshold)")  # fmt: skip
    return m.astype(bool)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman of two grids (average ranks); NaN when either is constant (no ranking)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(rank_agreement(torch.from_numpy(a), torch.from_numpy(b), k=1)["spearman"])


def ranking_metrics(scores: Any, members: Any, effect: Any = None) -> dict[str, float]:
    """How well a head ranking finds a circuit (module docstring).

    Args:
        scores: ``[layer, head]`` any ranking, higher = more in the circuit (finite).
        members: ``[layer, head]`` bool, the circuit's heads (at least one).
        effect: ``[layer, head]`` the heads' continuous effects (e.g. patching); its absolute
            value is compared. None: no effect metrics.

    Returns:
        ``roc_auc`` (NaN when every head is a member), ``precision_at_k``, ``recall_at_k`` and
        ``k`` (= number of members); with ``effect`` also ``spearman_effect`` (NaN when the scores
        or the effects are constant) and ``concordance_effect``. 1 is perfect, 0.5 (AUC, C) chance.

    Raises:
        InputError: shapes differ, non-finite scores, non-boolean or empty ``members``.

    >>> ranking_metrics([[1.0, 1.0, 1.0, 1.0]], [[True, False, False, False]])["roc_auc"]
    0.5
    """
    s = _grid(scores, "scores")
    if not np.isfinite(s).all():
        bad = [tuple(int(i) for i in ix) for ix in np.argwhere(~np.isfinite(s))[:5]]
        raise InputError(f"scores are NaN or infinite at heads {bad}; rank with finite scores "
                         "(e.g. 0 for a head a method cannot score)")  # fmt: skip
    m = _members(members, s.shape)
    hits = recall_at_k(m, s)
    out: dict[str, float] = {"roc_auc": concordance(m, s), "precision_at_k": hits,
                             "recall_at_k": hits, "k": int(m.sum())}  # fmt: skip
    if effect is not None:
        e = np.abs(_grid(effect, "effect"))
        if e.shape != s.shape:
            raise InputError(f"effect has shape {e.shape} but scores {s.shape}; pass one value "
                             "per head of the same model")  # fmt: skip
        out["spearman_effect"] = _spearman(s, e)
        out["concordance_effect"] = concordance(e, s)
    return out


def top_k_overlap(scores: Any, reference: Any, k: int) -> float:
    """The fraction of the ``reference``'s ``k`` top heads that are among the ``k`` top
    ``scores`` (heads tied at the scores' cut share the remaining places, so constant scores give
    the chance level ``k / n``; the reference's ties break layer-major).

    >>> top_k_overlap([[3.0, 2.0, 1.0, 0.0]], [[0.9, 0.1, 0.8, 0.0]], 2)
    0.5
    """
    s, r = _grid(scores, "scores"), _grid(reference, "reference")
    if s.shape != r.shape:
        raise InputError(f"scores {s.shape} and reference {r.shape} differ in shape")
    if not 1 <= k <= s.size:
        raise InputError(f"k must be between 1 and the {s.size} heads, got {k}")
    top = np.argsort(-r.ravel(), kind="stable")[:k]
    mask = np.zeros(s.size, dtype=bool)
    mask[top] = True
    return recall_at_k(mask, s.ravel())


def sae_agreement(scores: Any, effect: Any, ks: Sequence[int] = AGREEMENT_KS) -> dict[str, float]:
    """A ranking against exact patching: ``spearman`` with ``|effect|``, and for each ``k`` below
    the number of heads ``overlap_at_k`` (:func:`top_k_overlap`, a fraction of ``k``),
    ``heads_at_k`` (the same in heads) and ``chance_at_k`` (``k * k / n`` heads expected by
    chance)."""
    s, e = _grid(scores, "scores"), np.abs(_grid(effect, "effect"))
    out = {"spearman": _spearman(s, e)}
    for k in ks:
        if k < s.size:
            frac = top_k_overlap(s, e, k)
            out |= {f"overlap_at_{k}": frac, f"heads_at_{k}": frac * k,
                    f"chance_at_{k}": k * k / s.size}  # fmt: skip
    return out


def _num(x: Any) -> Any:
    """A JSON number: NaN/inf -> None, ints stay ints."""
    if isinstance(x, bool | int):
        return x
    x = float(x)
    return x if math.isfinite(x) else None


# -- the result ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MethodScore:
    """One method's head ranking and how it scored.

    Attributes:
        name: the method (:data:`METHODS`).
        scores: ``[layer, head]`` its ranking.
        metrics: :func:`ranking_metrics` against the reference.
        runtime_s: wall time from the batch to the ranking.
        note: what exactly ran.
    """

    name: str
    scores: Tensor
    metrics: dict[str, float]
    runtime_s: float
    note: str = ""


@dataclass(frozen=True, kw_only=True, eq=False)
class CircuitEvaluation(Result):
    """Head rankings of several methods scored against one reference (see the module docstring).

    Attributes:
        task: the task of the evaluated batch.
        reference: what the truth is (which patching, which circuit rule).
        members: ``[layer, head]`` bool, the reference circuit.
        effect: ``[layer, head]`` the reference's continuous effect (``max(|denoise|, |noise|)``).
        methods: one :class:`MethodScore` per method run, in :data:`METHODS` order.
        skipped: method -> why it did not run.
        agreement: :func:`sae_agreement` of the SAE with exact patching on the batch (empty
            unless both ran).
        batch: the evaluated batch (``task``, ``n``, ``seq_len``, ``seed``).
    """

    task: str
    reference: str
    members: Tensor
    effect: Tensor
    methods: tuple[MethodScore, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)

    def method(self, name: str) -> MethodScore:
        """The :class:`MethodScore` of ``name``."""
        for m in self.methods:
            if m.name == name:
                return m
        why = f" ({self.skipped[name]})" if name in self.skipped else ""
        raise InputError(f"no method {name!r} in this evaluation{why}; it has "
                         f"{[m.name for m in self.methods]}")  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        """One row per method: ``method``, the metrics, ``k``, ``runtime_s``, ``note``."""
        rows = [{"method": m.name, **{k: m.metrics.get(k, float("nan")) for k in METRICS},
                 "k": m.metrics.get("k"), "runtime_s": m.runtime_s, "note": m.note}
                for m in self.methods]  # fmt: skip
        return pd.DataFrame(rows, columns=["method", *METRICS, "k", "runtime_s", "note"])

    def figure(self, view: str = "metrics") -> go.Figure:
        """``metrics``: grouped bars of every metric per method; ``scores``: the methods' layer x
        head rankings side by side, with the reference effect (circuit heads marked) last."""
        if view == "metrics":
            fig = go.Figure()
            for m in self.methods:
                ys = [m.metrics.get(k, float("nan")) for k in METRICS]
                fig.add_bar(name=f"{m.name} ({m.runtime_s:.2g} s)", x=list(METRICS), y=ys,
                            hovertemplate=f"{m.name}<br>%{{x}}: %{{y:.3f}}<extra></extra>")  # fmt: skip
            fig.update_layout(barmode="group", yaxis_title="score (1 = perfect)",
                              title=f"{self.task}: head rankings vs {self.reference}")  # fmt: skip
            return fig
        if view != "scores":
            raise InputError(f"view must be 'metrics' or 'scores', got {view!r}")
        panels = [(m.name, m.scores.double()) for m in self.methods]
        panels.append(("reference |effect|", self.effect.double()))
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                            horizontal_spacing=0.04)  # fmt: skip
        n_layers, n_heads = self.effect.shape
        labels = [[f"L{a}H{h}" + (" *" if self.members[a, h] else "") for h in range(n_heads)]
                  for a in range(n_layers)]  # fmt: skip
        for col, (_, z) in enumerate(panels, start=1):
            top = float(z.abs().max()) or 1.0
            fig.add_trace(go.Heatmap(z=(z / top).numpy(), text=labels, coloraxis="coloraxis",
                                     customdata=z.numpy(), x=list(range(n_heads)),
                                     y=list(range(n_layers)),
                                     hovertemplate="%{text}: %{customdata:.4g}<extra></extra>"),
                          row=1, col=col)  # fmt: skip
            fig.update_yaxes(autorange="reversed", row=1, col=col)
        fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar_title": "/ max"},
                          title=f"{self.task}: head scores (x = head, y = layer; * circuit head)")  # fmt: skip
        return fig

    def payload(self) -> dict[str, Any]:
        """The CLI's ``--json`` body: ``reference``, ``task``, ``methods`` (name -> metrics,
        ``k``, ``runtime_s``, ``note``), ``circuit_heads``, ``skipped``, ``agreement``, ``batch``;
        NaN as null, so ``json.dumps(..., allow_nan=False)`` works."""
        heads = [[int(a), int(h)] for a, h in self.members.nonzero().tolist()]
        return {
            "reference": self.reference, "task": self.task, "circuit_heads": heads,
            "methods": {m.name: {**{k: _num(v) for k, v in m.metrics.items()},
                                 "runtime_s": _num(m.runtime_s), "note": m.note}
                        for m in self.methods},
            "skipped": dict(self.skipped),
            "agreement": {k: _num(v) for k, v in self.agreement.items()},
            "batch": json.loads(json.dumps(self.batch, default=str)),
        }  # fmt: skip


# -- the methods --------------------------------------------------------------------------------

Runner = Callable[[Model, TaskBatch, "SAEConfig", bool], tuple[Tensor, str]]


def _both_directions(fn: Callable[..., Any], model: Model, batch: TaskBatch, **kw: Any) -> Tensor:
    """``max(|denoise|, |noise|)`` of a head sweep (all positions), ``[layer, head]``."""
    d = fn(model, batch, site="heads", by="all", direction="denoise", **kw).scores
    n = fn(model, batch, site="heads", by="all", direction="noise", **kw).scores
    return torch.maximum(d.abs(), n.abs()).detach().cpu().float()


def _run_sae(model: Model, batch: TaskBatch, cfg: SAEConfig, progress: bool) -> tuple[Tensor, str]:
    from mechscope.circuits.sae import sae_circuit

    circ = sae_circuit(model, batch, config=cfg, progress=progress)
    return circ.node_scores.detach().cpu().float(), _sae_note(cfg)


def _sae_note(cfg: SAEConfig) -> str:
    return (f"discrete SAE node scores ({cfg.n_features} features, {cfg.epochs} epochs, "
            f"{cfg.n_train} training prompts, reduce={cfg.reduce})")  # fmt: skip


def _run_patching(
    model: Model, batch: TaskBatch, cfg: SAEConfig, progress: bool
) -> tuple[Tensor, str]:
    scores = _both_directions(patch_sweep, model, batch, progress=progress)
    return scores, "exact head patching, all positions, max(|denoise|, |noise|)"


def _run_attribution(model: Model, batch: TaskBatch, cfg: SAEConfig, progress: bool
                     ) -> tuple[Tensor, str]:  # fmt: skip
    scores = _both_directions(attribution_patch, model, batch)
    return (
        scores,
        "attribution patching of the head outputs, all positions, max(|denoise|, |noise|)",
    )


def _induction_detector(model: Model, batch: TaskBatch, progress: bool) -> tuple[Tensor, str]:
    from mechscope.circuits.head_stats import head_statistics

    rows = [row[: int(n)].tolist() for row, n in zip(batch.clean, batch.real_lengths, strict=True)]
    stats = head_statistics(model, rows, kinds=("induction", "previous_token"),
                            target_rows_only=True, progress=progress)  # fmt: skip
    note = (f"max(induction, previous-token score) (head_stats, query rows with a target) on the "
            f"{len(rows)} clean rows: the circuit is both kinds of head")  # fmt: skip
    return torch.maximum(stats.scores["induction"], stats.scores["previous_token"]).float(), note


def _retrieval_detector(model: Model, batch: TaskBatch, progress: bool) -> tuple[Tensor, str]:
    from mechscope.circuits.retrieval import retrieval_scores

    spans = None
    if "needle_start" not in batch.meta:  # e.g. several depths concatenated: the needle's value
        differs = (batch.clean != batch.corrupt).long()  # is the one token the corruption changes
        spans = [(int(r.argmax()), int(r.argmax()) + 1) for r in differs]
    res = retrieval_scores(model, batch, needle_spans=spans, progress=progress)
    note = (f"retrieval score (copy-paste of the needle while decoding) on the {batch.batch_size} "
            f"clean rows ({res.n_answered} answered)")  # fmt: skip
    return res.scores.float(), note


#: task -> the head analysis whose score ranks that task's circuit heads.
DETECTORS: dict[str, Callable[[Model, TaskBatch, bool], tuple[Tensor, str]]] = {
    "induction": _induction_detector,
    "retrieval": _retrieval_detector,
}


def _run_detector(model: Model, batch: TaskBatch, cfg: SAEConfig, progress: bool
                  ) -> tuple[Tensor, str]:  # fmt: skip
    return DETECTORS[batch.task](model, batch, progress)


RUNNERS: dict[str, Runner] = {"sae": _run_sae, "patching": _run_patching,
                              "attribution": _run_attribution, "detector": _run_detector}  # fmt: skip


# -- the harness --------------------------------------------------------------------------------


def _zoo_truth(model: Model) -> GroundTruth | None:
    spec = spec_of(model) or ""
    return GroundTruth.load(spec) if spec.startswith("zoo:") else None


def _patching_members(effect: Tensor) -> tuple[Tensor, str]:
    """The circuit of an exact-patching reference: the zoo's rule, or (when no head reaches it)
    the heads within half of the largest effect."""
    members = effect >= THRESHOLD
    rule = f"circuit rule: max(|denoise|, |noise|) >= {THRESHOLD}, the zoo's rule"
    if not bool(members.any()):
        top = float(effect.max())
        members = effect >= top / 2
        rule = (f"no head reaches the zoo's {THRESHOLD}; circuit: the heads with at least half "
                f"the largest effect ({top:.3g})")  # fmt: skip
    return members, rule


def _check_methods(methods: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = [methods]
    names = tuple(dict.fromkeys(methods)) if methods is not None else METHODS
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise InputError(f"unknown methods {bad or '(none given)'}; choose from {list(METHODS)}")
    return tuple(m for m in METHODS if m in names)


def evaluate_methods(
    model: Model,
    *,
    task: str | None = None,
    n: int | None = None,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    sae_config: SAEConfig | None = None,
    truth: GroundTruth | None = None,
    sae_result: SAECircuit | None = None,
    progress: bool = True,
) -> CircuitEvaluation:
    """Run head-ranking methods on one task batch and score each against the reference.

    Args:
        model: the model.
        task, n, seed: the batch, :func:`mechscope.circuits.sae.task_batch` ``(model, task, n,
            seed)`` (a zoo model's own task by default; IOI for a text model).
        methods: any of :data:`METHODS` (default all); ``detector`` is skipped, with the reason
            in :attr:`CircuitEvaluation.skipped`, for a task without one (:data:`DETECTORS`).
        sae_config: the SAE's config (default :class:`~mechscope.circuits.sae.SAEConfig()`).
        truth: the reference; None: the zoo ground truth of a ``zoo:`` model, else exact head
            patching on the batch (then :attr:`CircuitEvaluation.agreement` reports the SAE
            against it).
        sae_result: an :class:`~mechscope.circuits.sae.SAECircuit` already computed on this
            batch (same task, n, seed and config): the ``sae`` method then reads its node scores
            and runtime instead of training again.
        progress: progress bars.

    Raises:
        InputError: an unknown method, a truth of another shape than the model's heads, and
            whatever the methods raise on the batch (e.g. a task the model cannot solve).
    """
    from tqdm.auto import tqdm

    from mechscope.circuits.sae import SAEConfig, task_batch

    names = _check_methods(methods)
    cfg = sae_config if sae_config is not None else SAEConfig()
    batch = task_batch(model, task, n, seed)
    truth = truth if truth is not None else _zoo_truth(model)
    shape = (int(model.cfg.n_layers), int(model.cfg.n_heads))
    if truth is not None and (truth.n_layers, truth.n_heads) != shape:
        raise InputError(f"the truth {truth.name!r} has {truth.n_layers} x {truth.n_heads} heads "
                         f"but the model {shape[0]} x {shape[1]}; pass the model's own truth")  # fmt: skip
    ranked: dict[str, tuple[Tensor, str, float]] = {}
    skipped: dict[str, str] = {}
    for name in tqdm(names, desc="circuit methods", disable=not progress, leave=False):
        if name == "detector" and batch.task not in DETECTORS:
            skipped[name] = (f"no head-analysis detector for task {batch.task!r} (detectors "
                             f"exist for {sorted(DETECTORS)})")  # fmt: skip
            continue
        if name == "sae" and sae_result is not None:
            if sae_result.task != batch.task:
                raise InputError(f"sae_result was computed on task {sae_result.task!r}, this "
                                 f"evaluation's batch is {batch.task!r}; pass the same task")  # fmt: skip
            ranked[name] = (sae_result.node_scores.detach().cpu().float(), _sae_note(cfg),
                            float(sae_result.runtime["total_s"]))  # fmt: skip
            continue
        t0 = time.perf_counter()
        scores, note = RUNNERS[name](model, batch, cfg, progress)
        ranked[name] = (scores, note, time.perf_counter() - t0)

    exact = ranked["patching"][0] if "patching" in ranked else None
    if truth is not None:
        members = torch.from_numpy(truth.circuit_mask())
        effect = torch.from_numpy(truth.effect()).float()
        reference = (f"ground truth zoo:{truth.name} (exact head patching on its own patch "
                     f"batches, mean over {len(truth.batches)}; {truth.circuit_rule})")  # fmt: skip
    else:
        if exact is None:
            exact = _run_patching(model, batch, cfg, progress)[0]
        effect = exact
        members, rule = _patching_members(effect)
        reference = f"exact head patching on the same batch ({rule})"
    results = tuple(MethodScore(name=name, scores=s, note=note, runtime_s=dt,
                                metrics=ranking_metrics(s, members, effect))
                    for name, (s, note, dt) in ranked.items())  # fmt: skip
    agreement = (
        sae_agreement(ranked["sae"][0], exact) if "sae" in ranked and exact is not None else {}
    )
    info = {"task": batch.task, "n": batch.batch_size, "seq_len": batch.seq_len, "seed": seed}
    config = {"task": task, "n": n, "methods": list(names), "sae": asdict(cfg),
              "truth": truth.name if truth is not None else None}  # fmt: skip
    return CircuitEvaluation(provenance=Provenance.of(model, config, seed=seed), task=batch.task,
                             reference=reference, members=members, effect=effect, methods=results,
                             skipped=skipped, agreement=agreement, batch=info)  # fmt: skip
