"""Attribution patching: a first-order estimate of a whole activation-patching sweep.

Method (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale"; Syed, Rager
& Conmy 2023, "Attribution Patching Outperforms Automated Circuit Discovery"): the metric of the
run patched at activation ``a`` is linearised around the unpatched run,
``M(a_src) ≈ M(a_tgt) + (a_src - a_tgt) · dM/da |_tgt``. *Denoise* (the clean activation into the
corrupt run) takes the gradient on the corrupt run, *noise* (corrupt into clean) on the clean run.
One forward of the source run (:class:`~mechscope.probes.Tracer`) and one forward + one backward
of the patched-into run (a gradient tracer, as :func:`~mechscope.probes.trace_with_grad`) give the
estimate of every layer x position (x head) at once: 2 forwards + 1 backward instead of one
forward per patch. Heads sum the product over ``d_head``; ``by="all"`` sums over positions.

The result is a :class:`~mechscope.attribution.PatchResult` (an :class:`AttributionPatchResult`,
``method="attribution"``) laid out and normalised exactly as :func:`~mechscope.attribution.patch_sweep`
does, so the two compare cell by cell (:func:`rank_agreement`). The default metric is the task's
normalised logit difference; the normalisation is affine, so its gradient is the logit-difference
gradient divided by the clean-corrupt gap.

Caveats. It is a first-order Taylor estimate, exact only where the metric is linear in the
patched activation. It is poor for saturated or strongly nonlinear components: attention patterns
(softmax saturation), LayerNorm scales, large patches (``resid_pre`` where the tokens differ,
whose patched value is far from the unpatched one), and when the gradient is near zero at the
unpatched run while the effect is not (a saturated answer probability). Use it to rank candidates,
then confirm the top cells with the exact engine. Right-padded rows are run without an attention
mask, as the exact engine does. ``resid_mid``: in TransformerLens 4.3's bridge a write at
``hook_resid_mid`` (what the exact engine and TransformerLens's own patching do) reaches only part
of the block, while its gradient is the full derivative (equal to ``attn_out``'s); the estimate is
that of a true residual write (the same shift written at ``attn_out``), so it can disagree with the
exact ``resid_mid`` sweep beyond first-order error.

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 5, 4]])
>>> metric = lambda logits: logits[:, -1, 0].mean()
>>> r = attribution_patch(model, (clean, corrupt), site="heads", metric=metric)
>>> r.scores.shape, r.method, r.work["forwards"], r.work["backwards"]
(torch.Size([2, 4, 2]), 'attribution', 2, 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import cast

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.attribution.patching import (
    DEFAULT_METRIC,
    MetricFn,
    SweepConfig,
    _grid,
    _labels,
    sweep_inputs,
)
from mechscope.attribution.result import PatchResult
from mechscope.errors import InputError
from mechscope.metrics import Direction, Metric, answer_prob, logit_diff, normalised_patching
from mechscope.probes import Tracer
from mechscope.results import Provenance
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model


@dataclass(frozen=True, kw_only=True, eq=False)
class AttributionPatchResult(PatchResult):
    """A :class:`PatchResult` whose scores are the first-order estimate, not patched runs.

    Attributes:
        method: ``"attribution"`` (the exact engine's results have no such field: they are
            ``"exact"``).
    """

    kind = "attribution_patch"
    method: str = "attribution"


def _dtype_name(model: Model) -> str:
    return "float64" if next(model.parameters()).dtype == torch.float64 else "float32"


def _run(model: Model, tokens: Tensor, site: str, *, metric: MetricFn | None = None
         ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """One forward (and, with ``metric``, one backward): logits, activations and gradients."""
    n_layers = int(model.cfg.n_layers)
    with Tracer(model, sites=(site,), batch_size=len(tokens), grad=metric is not None,
                dtype=_dtype_name(model)) as tracer:  # fmt: skip
        logits, tr = tracer.forward(tokens, metric=cast(Metric | None, metric))
    acts = {ly: tr.get(site, ly) for ly in range(n_layers)}
    grads = {ly: tr.grad(site, ly) for ly in range(n_layers)} if metric is not None else {}
    return logits, acts, grads


def attribution_patch(
    model: Model,
    task_or_pair: TaskBatch | tuple[Tensor, Tensor],
    *,
    site: str = "resid_pre",
    by: str = "position",
    direction: str = "denoise",
    metric: MetricFn | None = None,
) -> AttributionPatchResult:
    """Estimate every patch of one site from 2 forwards and 1 backward.

    Args:
        model: the model.
        task_or_pair: a :class:`~mechscope.tasks.base.TaskBatch`, or ``(clean, corrupt)`` token
            tensors of equal shape (then ``metric`` is required).
        site: ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out`` or ``heads`` (``hook_z``).
        by: ``position`` (one estimate per layer x position (x head)) or ``all`` (every position
            patched at once: the sum over positions).
        direction: ``denoise`` (clean activation into the corrupt run, gradient on the corrupt
            run) or ``noise`` (corrupt into clean, gradient on the clean run).
        metric: ``logits [batch, pos, vocab] -> scalar``; the scores are then the estimated raw
            metric of each patched run. None: the task's logit difference at ``answer_pos``,
            normalised (0 = the unpatched run, 1 = the other run), as :func:`patch_sweep`.

    Returns:
        An :class:`AttributionPatchResult` (a :class:`PatchResult`) with scores ``[layer, pos]``,
        ``[layer, pos, head]``, ``[layer, head]`` or ``[layer]``, ``method="attribution"``,
        ``n_skipped=0`` (no patched run is made) and ``work`` counting 2 forwards, 1 backward.

    Raises:
        InputError: clean/corrupt shapes differ, no metric for a token pair, prompts longer than
            the context, a clean-corrupt gap too small to normalise.
        HookNameError: a site it does not patch, or one the model lacks.

    >>> import torch
    >>> from mechscope.models import load
    >>> model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
    >>> same = torch.tensor([[1, 2, 3]])
    >>> r = attribution_patch(model, (same, same), metric=lambda lg: lg[:, -1, 0].sum())
    >>> bool((r.scores == r.metric_corrupt).all())  # nothing differs: every estimate is the run
    True
    """
    cfg = SweepConfig(site=site, by=by, direction=direction, progress=False)
    clean, corrupt, task = sweep_inputs(model, cfg, task_or_pair, metric)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    b, n_pos = clean.shape
    device = next(model.parameters()).device
    clean, corrupt = clean.to(device), corrupt.to(device)

    if metric is None:
        assert task is not None
        rows = (task.answer.to(device), task.corrupt_answer.to(device), task.answer_pos.to(device))
        grad_metric: MetricFn = lambda lg: logit_diff(lg, *rows).mean()  # noqa: E731
        name = DEFAULT_METRIC
    else:
        user = metric
        grad_metric = lambda lg: user(lg).float() if lg.dtype != torch.float64 else user(lg)  # noqa: E731
        name = getattr(metric, "__name__", "metric")

    denoise = cfg.direction == "denoise"
    src_tokens, tgt_tokens = (clean, corrupt) if denoise else (corrupt, clean)
    src_logits, src_act, _ = _run(model, src_tokens, cfg.site)
    tgt_logits, tgt_act, tgt_grad = _run(model, tgt_tokens, cfg.site, metric=grad_metric)
    with torch.no_grad():
        m_src, m_tgt = float(grad_metric(src_logits)), float(grad_metric(tgt_logits))
        probs = None
        if task is not None:
            pair = (src_logits, tgt_logits) if denoise else (tgt_logits, src_logits)
            probs = [float(answer_prob(lg, task.answer.to(lg.device), task.answer_pos.to(lg.device)).mean())
                     for lg in pair]  # [clean, corrupt]  # fmt: skip
    m_clean, m_corrupt = (m_src, m_tgt) if denoise else (m_tgt, m_src)

    per_layer = []
    for ly in range(n_layers):
        diff = (src_act[ly] - tgt_act[ly]).double()
        prod = diff * tgt_grad[ly].double()  # [batch, pos, (head,) d]
        delta = prod.sum(-1).sum(0)  # [pos, (head)]
        per_layer.append(delta.sum(0) if cfg.by == "all" else delta)
    axes, shape = _grid(cfg, n_layers, n_pos, n_heads)
    est = torch.stack(per_layer).reshape(shape) + m_tgt  # the estimated raw metric
    scores = est.float()
    if metric is None:
        scores = torch.as_tensor(normalised_patching(est, m_clean, m_corrupt,
                                                     cast(Direction, cfg.direction))).float()  # fmt: skip
    u = int(torch.tensor(shape).prod())
    work = {"patches": u, "run": 0, "skipped": 0, "forwards": 2, "backwards": 1, "rows": 2 * b}
    return AttributionPatchResult(
        provenance=Provenance.of(model, {**asdict(cfg), "metric": name, "method": "attribution"}),
        scores=scores, axes=axes, tokens=_labels(model, clean[0].cpu()), site=cfg.site,
        direction=cfg.direction, metric=name, normalised=metric is None, metric_clean=m_clean,
        metric_corrupt=m_corrupt, n_patches=u, n_skipped=0,
        prob_clean=probs[0] if probs is not None else None,
        prob_corrupt=probs[1] if probs is not None else None, work=work,
    )  # fmt: skip


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank (as ``scipy.stats.rankdata``)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def rank_agreement(
    estimate: PatchResult | Float[Tensor, "*est"],
    exact: PatchResult | Float[Tensor, "*exact"],
    *,
    k: int = 10,
) -> dict[str, float]:
    """How well an estimate ranks the cells of an exact sweep.

    Args:
        estimate: an :func:`attribution_patch` result (or its scores).
        exact: a :func:`patch_sweep` result of the same site, by and direction (or its scores).
        k: how many top cells (by ``|score|``) to compare.

    Returns:
        ``{"spearman": ..., "top_k_overlap": ..., "sign_agreement": ..., "k": ...}``: the Spearman
        rank correlation of the signed scores over every cell (average ranks for ties),
        the fraction of the exact top-``k`` cells by ``|score|`` that are also in the estimate's
        top-``k``, and the fraction of the exact top-``k`` cells whose sign the estimate gets
        right.

    Raises:
        InputError: the two grids differ in shape, ``k < 1``, or a grid is constant (no ranking).

    >>> import torch
    >>> agree = rank_agreement(torch.tensor([0.1, 0.5, -0.2]), torch.tensor([0.2, 0.9, -0.1]), k=1)
    >>> round(agree["spearman"], 6), agree["top_k_overlap"], agree["sign_agreement"]
    (1.0, 1.0, 1.0)
    """
    a = (estimate.scores if isinstance(estimate, PatchResult) else estimate).detach().cpu()
    b = (exact.scores if isinstance(exact, PatchResult) else exact).detach().cpu()
    if a.shape != b.shape:
        raise InputError(f"estimate {tuple(a.shape)} and exact {tuple(b.shape)} scores differ in "
                         "shape; compare results of the same site, by and model")  # fmt: skip
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    if denom == 0.0:
        raise InputError("a score grid is constant, so it has no ranking to compare")
    k = min(k, a.numel())
    top_a = set(a.abs().topk(k).indices.tolist())
    top_b = b.abs().topk(k).indices
    overlap = len(top_a & set(top_b.tolist())) / k
    signs = float((torch.sign(a[top_b]) == torch.sign(b[top_b])).double().mean())
    return {"spearman": float((ra * rb).sum()) / denom, "top_k_overlap": overlap,
            "sign_agreement": signs, "k": k}


def scores_payload(result: PatchResult) -> Mapping[str, object]:
    """The JSON-ready summary of a patching result (what ``mechscope patch --json`` prints)."""
    return {
        "scores": result.scores.tolist(), "axes": list(result.axes), "tokens": list(result.tokens),
        "p_clean": result.prob_clean, "p_corrupt": result.prob_corrupt,
        "metric_clean": result.metric_clean, "metric_corrupt": result.metric_corrupt,
        "site": result.site, "direction": result.direction, "metric": result.metric,
        "method": getattr(result, "method", "exact"), "n_patches": result.n_patches,
        "n_skipped": result.n_skipped,
    }  # fmt: skip


__all__ = ["AttributionPatchResult", "attribution_patch", "rank_agreement", "scores_payload"]
