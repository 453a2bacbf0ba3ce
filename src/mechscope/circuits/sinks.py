"""Attention sinks and attention calibration (METHODS.md section 4).

- **ACT** (Yu et al., ICML 2024; code GATECH-EIC/ACT): key ``j``'s score in a head is the mean
  attention it gets from the queries that can see it, ``sum_i A[i, j] / (N - j)`` for a causal
  ``N x N`` pattern (:func:`act_key_scores`); keys above 0.1 are sinks (:func:`sink_mask`).
  :func:`calibrate` multiplies a head's sink columns by ``beta`` (0.4) and gives each row's freed
  mass to the other keys in proportion to their attention (rows stay stochastic). As in the
  reference, each head's *first* sink (usually token 0) is kept: not scaled, and, being outside the
  calibrated set, it receives its share of the freed mass. A row with no attention outside the
  calibrated columns is left as it is. Heads are chosen offline (:func:`select_calibration_heads`):
  each calibrated alone on a dev split, kept if the metric improves, measured on a held-out split.
- **VAR** (Kang et al., ICLR 2025): sink tokens carry massive activations in a few fixed dims,
  ``|RMSNorm(h)|_d > 20`` (:func:`massive_dims`), normalised here by the RMS *without* the norm's
  weight: SmolLM2's ``ln1`` weight on its massive dim is ~0.1-0.2, so with it nothing passes 20,
  while the weight-free value at BOS is ~23 of a possible ``sqrt(d_model) = 24``. That ceiling
  means the criterion cannot fire at 20 when ``d_model < 400`` (MiniLM: 19.6); lower the threshold
  there (the per-layer ``peak`` is always reported).

Non-causal encoders (MiniLM/BERT): a key's score is the mean over all ``N`` real queries; causality
is read from the pattern (nothing above the diagonal) unless ``causal=`` is given. Caveat: late keys
are averaged over few queries (a previous-token head alone gives key ``N - k`` about ``1 / k``), so
:func:`find_sinks` scores only keys seen by ``min_queries`` (8) real queries (1: exactly ACT).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.circuits.attention import causal_mask, pattern_interventions
from mechscope.circuits.attn_path import choose_path, layer_stats
from mechscope.circuits.massive import Massive, massive_dims
from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap, token_layer_heatmap
from mechscope.kernels import act_mean
from mechscope.models.loading import spec_of
from mechscope.models.zoo.data import EVAL_BATCHES
from mechscope.models.zoo.recipes import RECIPES
from mechscope.probes import intervene
from mechscope.probes.interventions import Intervention
from mechscope.probes.tokens import Prompts, tokenize
from mechscope.results import Provenance, Result
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model

__all__ = [
    "AttentionSinks", "CalibrationResult", "Massive", "act_key_scores", "calibrate",
    "calibration", "default_run", "evaluate", "find_sinks", "massive_dims",
    "select_calibration_heads", "sink_mask",
]  # fmt: skip

Heads = Sequence[tuple[int, int]]
SinkSpec = Sequence[int] | Callable[[Tensor], Tensor] | None


def _check_threshold(threshold: float, what: str = "threshold") -> float:
    if not float(threshold) > 0 or not np.isfinite(threshold):
        raise InputError(f"{what} must be a positive finite number, got {threshold}; "
                         "ACT uses 0.1 for sinks, VAR 20 for massive activations")  # fmt: skip
    return float(threshold)


def _check_beta(beta: float) -> float:
    if not 0.0 < float(beta) <= 1.0:
        raise InputError(f"beta must lie in (0, 1] (the factor sink columns are multiplied by; "
                         f"1 = no change, ACT uses 0.4), got {beta}")  # fmt: skip
    return float(beta)


def _check_pattern(pattern: Tensor) -> None:
    if pattern.ndim != 4 or pattern.shape[-2] > pattern.shape[-1]:
        raise InputError(f"pattern must be [batch, head, query, key] with query <= key, got "
                         f"{tuple(pattern.shape)}")  # fmt: skip


def infer_lengths(pattern: Float[Tensor, "batch head query key"]) -> Tensor:
    """Real lengths of a right-padded batch read from its pattern: one past the last key that
    any query attends to (padded keys are masked for every query)."""
    seen = (pattern != 0).flatten(1, 2).any(1)  # [batch, key]
    idx = torch.arange(1, seen.shape[-1] + 1, device=seen.device)
    return (seen * idx).amax(-1).clamp(min=1).cpu()


def is_causal(pattern: Float[Tensor, "batch head query key"]) -> bool:
    """Whether no query attends to a key after its own position (query block = last positions)."""
    return not bool((pattern.masked_fill(causal_mask(pattern), 0) != 0).any())


def act_key_scores(pattern: Float[Tensor, "batch head query key"], lengths: Tensor | None = None,
                   *, causal: bool | None = None, min_queries: int = 1
                   ) -> Float[Tensor, "batch head key"]:  # fmt: skip
    """ACT's key score: the mean attention key ``j`` receives from the real queries that see it.

    Causal ``N x N``: ``sum_i A[i, j] / (N - j)``; non-causal: ``sum_i A[i, j] / N``. The query
    block may be the last ``q`` of ``k`` positions. ``lengths`` (real tokens per row; None: all)
    drop padded queries and keys (padded keys score 0). Keys seen by fewer than
    ``min(min_queries, length)`` real queries score 0. ``causal=None`` reads it from the pattern.

    >>> a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.8, 0.1, 0.1]])[None, None]
    >>> act_key_scores(a).squeeze().tolist()
    [0.7666666507720947, 0.30000001192092896, 0.10000000149011612]
    """
    _check_pattern(pattern)
    b, _, q, k = pattern.shape
    if causal is None:
        causal = is_causal(pattern)
    lengths = torch.full((b,), k) if lengths is None else torch.as_tensor(lengths).long().cpu()
    dev = pattern.device
    valid_k = torch.arange(k)[None, :] < lengths[:, None]  # [batch, key]
    valid_q = valid_k[:, k - q :]  # [batch, query]
    visible = causal_mask(pattern).cpu() if causal else torch.ones(q, k, dtype=torch.bool)
    seen = visible[None] & valid_q[:, :, None] & valid_k[:, None, :]  # [batch, query, key]
    counts = seen.sum(1)  # [batch, key]
    sums = (pattern.float() * seen[:, None].to(dev)).sum(-2)  # [batch, head, key]
    scores = sums / counts.clamp(min=1)[:, None].to(dev)
    need = lengths.clamp(max=max(1, int(min_queries)))
    return scores * ((counts >= need[:, None]) & valid_k)[:, None].to(dev)


def _key_scores(received: Tensor, lengths: Tensor, causal: bool, min_queries: int) -> Tensor:
    """:func:`act_key_scores` from the attention each key receives (``[batch, head, key]``)."""
    j = torch.arange(received.shape[-1])[None, :]
    counts = torch.where(j < lengths[:, None], lengths[:, None] - j * int(causal), 0)
    keep = counts >= lengths.clamp(max=max(1, int(min_queries)))[:, None]
    return act_mean(received, lengths, causal=causal) * keep[:, None]


def sink_mask(key_scores: Float[Tensor, "*batch key"], threshold: float = 0.1
              ) -> Bool[Tensor, "*batch key"]:  # fmt: skip
    """Sinks: keys whose ACT score exceeds ``threshold`` (0.1).

    >>> sink_mask(torch.tensor([0.7, 0.05, 0.2])).tolist()
    [True, False, True]
    """
    return key_scores > _check_threshold(threshold)


def calibrate(pattern: Float[Tensor, "batch head query key"], sinks: Tensor, beta: float = 0.4,
              keep_first: bool = True) -> Float[Tensor, "batch head query key"]:  # fmt: skip
    """ACT calibration: sink columns times ``beta``; each row's freed mass ``(1 - beta) * S`` goes
    to the other keys in proportion to their attention; rows stay stochastic.

    ``sinks``: a bool mask broadcastable to ``[batch, head, key]`` (e.g. ``[key]``); ``beta`` in
    (0, 1] (1 returns ``pattern`` itself); ``keep_first``: leave each head's first sink alone (ACT).

    >>> a = torch.tensor([[[[0.6, 0.3, 0.1]]]])
    >>> calibrate(a, torch.tensor([True, True, False]), beta=0.5).squeeze().tolist()  # 0 kept
    [0.7285714149475098, 0.15000000596046448, 0.12142857164144516]
    """
    _check_pattern(pattern)
    beta = _check_beta(beta)
    b, h, _, k = pattern.shape
    try:
        mask = torch.as_tensor(sinks, dtype=torch.bool, device=pattern.device).expand(b, h, k)
    except RuntimeError:
        raise InputError(f"sinks of shape {tuple(torch.as_tensor(sinks).shape)} do not broadcast "
                         f"to [batch, head, key] = {(b, h, k)}") from None  # fmt: skip
    if keep_first:  # drop each head's first sink
        mask = mask & (mask.long().cumsum(-1) > 1)
    if beta == 1.0 or not bool(mask.any()):
        return pattern
    p = pattern.float()
    cal = mask[:, :, None, :].float()  # [batch, head, 1, key]
    freed = (1.0 - beta) * (p * cal).sum(-1, keepdim=True)
    rest = p * (1.0 - cal)
    total = rest.sum(-1, keepdim=True)
    new = p * (1.0 - (1.0 - beta) * cal) + freed * rest / total.clamp(min=torch.finfo(p.dtype).tiny)
    return torch.where(total > 0, new, p).to(pattern.dtype)


def _token_strs(model: Model, ids: Sequence[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [str(int(i)) for i in ids]
    return [str(t) for t in tok.convert_ids_to_tokens([int(i) for i in ids])]


def _nan_list(x: Tensor) -> Any:
    return [_nan_list(v) for v in x] if x.ndim else (None if torch.isnan(x) else float(x))


@dataclass(frozen=True, kw_only=True, eq=False)
class AttentionSinks(Result):
    """Sinks of every head over a set of prompts.

    Attributes:
        scores: ``[layer, head]`` share of the head's attention its sinks absorb (per prompt: the
            attention on that head's sinks, mean over real queries, query 0 excluded when causal;
            then the mean over prompts). ``first_share``: the same for position 0 alone.
        key_scores, sink_freq: ``[layer, head, pos]`` mean ACT key score, and the fraction of
            prompts where ``pos`` is a sink, over the prompts that have ``pos`` (NaN: none).
        heads: heads whose sinks absorb more than half their attention (``scores > 0.5``).
        sinks: per sink position: ``position``, ``tokens`` ({token: prompts}), ``frequency``
            (fraction of prompt x layer x head), ``layers`` (a sink of >= half the heads).
        hidden: token -> number of (prompt, layer, head) sink events at positions > 0.
        massive: per layer's ``resid_pre`` (what its attention reads): ``dims``, ``positions``
            ({pos: prompts}), ``tokens`` ({token: count}), ``peak`` (largest normalised value).
        prompt_tokens: the first prompt's tokens (the token view's x axis).
    """

    kind = "attention_sinks"
    scores: Tensor
    key_scores: Tensor
    sink_freq: Tensor
    first_share: Tensor
    heads: tuple[tuple[int, int], ...]
    sinks: list[dict[str, Any]]
    hidden: dict[str, int]
    massive: list[dict[str, Any]]
    prompt_tokens: list[str]
    lengths: list[int]
    causal: bool
    threshold: float
    massive_threshold: float
    attention_path: dict[str, str] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        n_layers, n_heads = self.scores.shape
        hidden = self.sink_freq[..., 1:].nan_to_num().sum(-1)
        rows = [{"layer": layer, "head": head, "absorbed": float(self.scores[layer, head]),
                 "first_share": float(self.first_share[layer, head]),
                 "n_hidden_sinks": float(hidden[layer, head]),
                 "sink_head": (layer, head) in self.heads}
                for layer in range(n_layers) for head in range(n_heads)]  # fmt: skip
        return pd.DataFrame(rows)

    def figure(self, view: Literal["heads", "tokens"] = "heads") -> go.Figure:
        if view == "heads":
            return layer_head_heatmap(self.scores.numpy(), colorscale="Viridis",
                                      title="share of attention absorbed by sink tokens")  # fmt: skip
        if view == "tokens":
            n = len(self.prompt_tokens)
            freq = self.sink_freq[..., :n].nan_to_num().mean(1)  # [layer, pos]
            return token_layer_heatmap(freq.numpy(), self.prompt_tokens, colorscale="Viridis",
                                       title="fraction of heads for which the token is a sink")  # fmt: skip
        raise InputError(f"unknown view {view!r}; choose 'heads' or 'tokens'")

    def payload(self) -> dict[str, Any]:
        return {"scores": _nan_list(self.scores), "heads": [list(h) for h in self.heads],
                "sinks": self.sinks, "hidden": self.hidden,
                "massive": [{**m, "positions": {str(k): v for k, v in m["positions"].items()}}
                            for m in self.massive],
                "first_share": _nan_list(self.first_share), "causal": self.causal,
                "attention_path": self.attention_path}  # fmt: skip


def find_sinks(model: Model, prompts: Prompts, *, threshold: float = 0.1,
               massive_threshold: float = 20.0, min_queries: int = 8, min_frequency: float = 0.01,
               path: str = "auto", progress: bool = True) -> AttentionSinks:  # fmt: skip
    """ACT sinks of every head and VAR massive dimensions of the residual stream over ``prompts``.

    ``prompts``: text, token ids or a TaskBatch (its clean rows). ``threshold``: ACT's;
    ``massive_threshold``: VAR's (:func:`massive_dims`); ``min_queries``: keys seen by fewer real
    queries are not scored (module docstring); ``min_frequency``: a position > 0 is listed in
    ``sinks`` when a sink of at least this fraction of prompt x layer x head (``hidden`` counts all).
    ``path``: how attention is read (:mod:`mechscope.circuits.attn_path`): ``"auto"`` takes the
    statistics path (no ``[query, key]`` tensor) when the patterns would exceed the memory budget;
    the result's ``attention_path`` says which ran and why.
    """
    threshold = _check_threshold(threshold)
    _check_threshold(massive_threshold, "massive_threshold")
    tokens, lengths = tokenize(model, prompts)
    choice = choose_path(model, lengths, path)
    if choice.path == "patterns":
        _require_patterns(model)
    first_tokens = _token_strs(model, tokens[0, : int(lengths[0])].tolist())
    order = lengths.argsort(descending=True, stable=True)  # batch prompts of similar length
    tokens, lengths = tokens[order], lengths[order]
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    width = tokens.shape[1]
    key_sum, sink_sum = torch.zeros(2, n_layers, n_heads, width)
    absorbed, first = torch.zeros(2, n_layers, n_heads)
    have = (torch.arange(width)[None, :] < lengths[:, None]).sum(0).float()  # prompts per position
    massive: list[dict[str, Any]] = [{"layer": i, "dims": set(), "positions": Counter(),
                                      "tokens": Counter(), "peak": 0.0} for i in range(n_layers)]  # fmt: skip
    sink_pos: set[int] = set()
    all_strs = [_token_strs(model, row[: int(m)].tolist()) for row, m in zip(tokens, lengths, strict=True)]
    hidden: Counter[str] = Counter()
    causal_seen: bool | None = None
    for ls in layer_stats(model, tokens, lengths, choice, resid=True, progress=progress, desc="sinks"):
        layer, lens, n = ls.layer, ls.lengths, int(ls.lengths.max())
        strs = [all_strs[int(r)] for r in ls.rows]
        if causal_seen is None:
            causal_seen = ls.causal
        received = ls.stats.received.float().cpu()  # [batch, head, key]: attention each key gets
        ks = _key_scores(received, lens, causal_seen, min_queries)
        mask = sink_mask(ks, threshold)  # [batch, head, key]
        key_sum[layer, :, :n] += ks.sum(0)
        sink_sum[layer, :, :n] += mask.float().sum(0)
        q0 = int(causal_seen)  # query 0 of a causal model sees only key 0: its row is left out
        later = received.clone()
        later[..., 0] -= q0
        n_q = (lens - q0).clamp(min=1).float()[:, None]  # real queries from q0
        absorbed[layer] += ((later * mask).sum(-1) / n_q).sum(0)
        first[layer] += (later[..., 0] / n_q).sum(0)
        for bi, _, j in mask.nonzero().tolist():
            sink_pos.add(j)
            if j > 0:
                hidden[strs[bi][j]] += 1
        assert ls.resid_pre is not None
        mas = massive_dims(ls.resid_pre, massive_threshold, lens)
        rec = massive[layer]
        rec["dims"].update(mas.dims.tolist())
        rec["peak"] = max(rec["peak"], float(mas.peak.max()))
        for bi, j in mas.tokens.nonzero().tolist():
            rec["positions"][j] += 1
            rec["tokens"][strs[bi][j]] += 1
    n_prompts = tokens.shape[0]
    per_pos = have.clamp(min=1)
    key_mean = (key_sum / per_pos).masked_fill(have == 0, float("nan"))
    freq = (sink_sum / per_pos).masked_fill(have == 0, float("nan"))
    scores, first_share = absorbed / n_prompts, first / n_prompts
    sinks = []
    for j in sorted(sink_pos):
        f = freq[..., j]
        if j > 0 and float(f.mean()) < min_frequency:
            continue
        toks = Counter(row[j] for row in all_strs if j < len(row))
        sinks.append({"position": j, "tokens": dict(toks.most_common(5)),
                      "frequency": float(f.mean()),
                      "layers": [i for i, v in enumerate(f.mean(1).tolist()) if v >= 0.5]})  # fmt: skip
    heads = tuple((int(a), int(b)) for a, b in (scores > 0.5).nonzero().tolist())
    for rec in massive:
        rec["dims"] = sorted(int(d) for d in rec["dims"])
        rec["positions"] = dict(sorted(rec["positions"].items()))
        rec["tokens"] = dict(rec["tokens"].most_common(10))
    config = {"threshold": threshold, "massive_threshold": massive_threshold,
              "min_queries": min_queries, "min_frequency": min_frequency, "n_prompts": n_prompts,
              "path": path}  # fmt: skip
    return AttentionSinks(
        provenance=Provenance.of(model, config), scores=scores, key_scores=key_mean,
        sink_freq=freq, first_share=first_share, heads=heads, sinks=sinks,
        hidden=dict(hidden.most_common(20)), massive=massive,
        prompt_tokens=first_tokens, lengths=lengths[order.argsort()].tolist(),
        causal=bool(causal_seen), threshold=threshold, massive_threshold=float(massive_threshold),
        attention_path=choice.as_dict(),
    )  # fmt: skip


def _require_patterns(model: Model) -> None:
    hooks = model.hook_dict
    if any(f"blocks.{i}.attn.hook_pattern" not in hooks for i in range(int(model.cfg.n_layers))):
        raise InputError("this model has no attention-pattern hook (blocks.<layer>.attn."
                         "hook_pattern); sinks are read from and calibrated on the pattern: load "
                         "the model with mechscope.models.load, whose bridge fires it")  # fmt: skip


def _sink_fn(sinks: SinkSpec, threshold: float) -> Callable[[Tensor], Tensor]:
    if sinks is None:  # ACT: detected per input and head, on the pattern being calibrated
        return lambda p: sink_mask(act_key_scores(p, infer_lengths(p)), threshold)
    if callable(sinks):
        return sinks
    pos = torch.tensor([int(p) for p in sinks], dtype=torch.long)
    if not len(pos):
        raise InputError("sink positions are empty; pass None to detect sinks per input")

    def fixed(pattern: Tensor) -> Tensor:
        k = pattern.shape[-1]
        if bool(((pos < -k) | (pos >= k)).any()):
            raise InputError(f"sink positions {pos.tolist()} fall outside a pattern of {k} keys")
        return torch.zeros(k, dtype=torch.bool).index_fill(0, pos % k, True).to(pattern.device)

    return fixed


def calibration(heads: Heads, sinks: SinkSpec = None, *, beta: float = 0.4,
                threshold: float = 0.1, keep_first: bool = True,
                positions: Tensor | None = None) -> list[Intervention]:  # fmt: skip
    """ACT calibration of ``heads`` as :class:`~mechscope.probes.Apply` interventions on ``patterns``.

    ``sinks``: None (default, as ACT): detected on the fly in every forward, per input and head
    (:func:`act_key_scores` > ``threshold`` over that forward's queries, lengths read by
    :func:`infer_lengths`); or fixed key positions (e.g. from :func:`find_sinks`); or
    ``fn(pattern) -> bool mask`` broadcastable to ``[batch, head, key]``. ``beta`` in (0, 1] (1:
    no change); ``keep_first``: as ACT; ``positions``: query positions to calibrate (None: all).

    >>> [(s.layer, s.heads) for s in calibration([(1, 0), (0, 2)])]
    [(0, (2,)), (1, (0,))]
    """
    beta = _check_beta(beta)
    find = _sink_fn(sinks, _check_threshold(threshold))
    heads = [(int(layer), int(head)) for layer, head in heads]
    if not heads:
        raise InputError("no heads to calibrate; pass (layer, head) pairs")

    def fn(pattern: Tensor) -> Tensor:
        return calibrate(pattern, find(pattern), beta, keep_first)

    return pattern_interventions(heads, fn, positions)


Batches = TaskBatch | Sequence[TaskBatch]
MetricName = Literal["accuracy", "logit_diff"]


def _as_list(batches: Batches, what: str) -> list[TaskBatch]:
    out = [batches] if isinstance(batches, TaskBatch) else list(batches)
    if not out or not all(isinstance(b, TaskBatch) for b in out):
        raise InputError(f"{what} must be a TaskBatch or a non-empty list of them")
    return out


@torch.no_grad()
def evaluate(model: Model, batches: Batches, heads: Heads = (), *, beta: float = 0.4,
             sinks: SinkSpec = None, threshold: float = 0.1, batch_size: int = 16
             ) -> dict[str, float]:  # fmt: skip
    """Accuracy and mean logit difference over ``batches`` with ``heads`` calibrated (none:
    the unchanged model); prompts run ``batch_size`` at a time."""
    specs = calibration(heads, sinks, beta=beta, threshold=threshold) if heads else []
    device = getattr(model.cfg, "device", None) or "cpu"
    correct, diffs = [], []
    with intervene(model, specs):
        for batch in _as_list(batches, "batches"):
            tokens, lengths = tokenize(model, batch)
            for s in range(0, tokens.shape[0], batch_size):
                sl = slice(s, s + batch_size)
                lens = lengths[sl]
                ids = tokens[sl, : int(lens.max())]
                mask = (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long()
                logits = model(ids.to(device), attention_mask=mask.to(device)).float()
                rows = torch.arange(ids.shape[0], device=logits.device)
                last = logits[rows, batch.answer_pos[sl].to(logits.device)]
                ans, wrong = (t[sl].to(last.device) for t in (batch.answer, batch.corrupt_answer))
                correct.append((last.argmax(-1) == ans).float().cpu())
                diffs.append((last[rows, ans] - last[rows, wrong]).cpu())
    return {"accuracy": float(torch.cat(correct).mean()), "logit_diff": float(torch.cat(diffs).mean()),
            "n": int(sum(len(c) for c in correct))}  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class CalibrationResult(Result):
    """ACT head selection: ``scores`` ``[layer, head]`` = dev metric change with that head alone
    calibrated (NaN: not a candidate); ``heads``: kept (improved), best first; ``dev`` and
    ``held_out`` (empty if none given): ``baseline`` and ``calibrated`` (kept heads) metrics."""

    kind = "attention_calibration"
    scores: Tensor
    heads: tuple[tuple[int, int], ...]
    dev: dict[str, dict[str, float]]
    held_out: dict[str, dict[str, float]]
    metric: str
    beta: float

    @property
    def accuracy_change(self) -> float | None:
        """Held-out accuracy with the kept heads calibrated minus the baseline (None: no split)."""
        ho = self.held_out
        return ho["calibrated"]["accuracy"] - ho["baseline"]["accuracy"] if ho else None

    def to_frame(self) -> pd.DataFrame:
        n_layers, n_heads = self.scores.shape
        return pd.DataFrame([{"layer": a, "head": b, "dev_change": float(self.scores[a, b]),
                              "kept": (a, b) in self.heads}
                             for a in range(n_layers) for b in range(n_heads)])  # fmt: skip

    def figure(self, view: Literal["heads"] = "heads") -> go.Figure:
        if view != "heads":
            raise InputError(f"unknown view {view!r}; CalibrationResult has the 'heads' view")
        title = f"dev {self.metric} change, head calibrated alone (beta={self.beta})"
        return layer_head_heatmap(self.scores.numpy(), zmid=0.0, title=title)

    def payload(self) -> dict[str, Any]:
        return {"scores": _nan_list(self.scores), "heads": [list(h) for h in self.heads],
                "dev": self.dev, "held_out": self.held_out, "metric": self.metric,
                "beta": self.beta, "accuracy_change": self.accuracy_change}  # fmt: skip


def select_calibration_heads(model: Model, dev_batches: Batches, *,
                             held_out: Batches | None = None, beta: float = 0.4,
                             candidates: Heads | None = None, metric: MetricName = "accuracy",
                             threshold: float = 0.1, batch_size: int = 16,
                             progress: bool = True) -> CalibrationResult:  # fmt: skip
    """ACT's offline search: calibrate each candidate head alone on the dev split and keep it when
    ``metric`` improves (strictly); then measure the kept set on ``held_out``.

    Sinks are detected per input (``calibration(sinks=None)``). ``candidates`` default to every
    head. One forward over the dev split per candidate (prompts batched).
    """
    _require_patterns(model)
    beta = _check_beta(beta)
    if metric not in ("accuracy", "logit_diff"):
        raise InputError(f"metric must be 'accuracy' or 'logit_diff', got {metric!r}")
    dev = _as_list(dev_batches, "dev_batches")
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if candidates is None:
        candidates = [(a, b) for a in range(n_layers) for b in range(n_heads)]
    cands = [(int(a), int(b)) for a, b in candidates]
    bad = [h for h in cands if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad or not cands:
        raise InputError(f"candidate heads {bad or '[]'} out of range for {n_layers} layers x "
                         f"{n_heads} heads; pass (layer, head) pairs inside the model")  # fmt: skip
    kw: dict[str, Any] = {"beta": beta, "threshold": threshold, "batch_size": batch_size}
    base = evaluate(model, dev, **kw)
    scores = torch.full((n_layers, n_heads), float("nan"))
    for head in tqdm(cands, desc="calibrate heads", disable=not progress, leave=False):
        scores[head] = evaluate(model, dev, [head], **kw)[metric] - base[metric]
    kept = sorted((h for h in cands if float(scores[h]) > 0), key=lambda h: -float(scores[h]))
    dev_out = {"baseline": base, "calibrated": evaluate(model, dev, kept, **kw) if kept else base}
    held: dict[str, dict[str, float]] = {}
    if held_out is not None:
        ho = _as_list(held_out, "held_out")
        hb = evaluate(model, ho, **kw)
        held = {"baseline": hb, "calibrated": evaluate(model, ho, kept, **kw) if kept else hb}
    config = {"beta": beta, "metric": metric, "threshold": threshold,
              "n_candidates": len(cands), "n_dev": base["n"]}  # fmt: skip
    return CalibrationResult(provenance=Provenance.of(model, config), scores=scores,
                             heads=tuple(kept), dev=dev_out, held_out=held, metric=metric,
                             beta=beta)  # fmt: skip


#: Built-in prompts for text models (the CLI's run with no --prompt).
PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Alice went to the market to buy apples. When she came home, she gave one to Bob.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. Millions watched.",
)


def _zoo_task(model: Model, n: int, seed: int) -> list[TaskBatch] | None:
    spec = spec_of(model) or ""
    recipe = RECIPES.get(spec[4:]) if spec.startswith("zoo:") else None
    return None if recipe is None else EVAL_BATCHES[recipe.task](recipe, n, seed)


def default_prompts(model: Model, *, task: str | None = None, n: int | None = None,
                    seed: int = 0) -> list[Any]:  # fmt: skip
    """What :func:`default_run` traces: a zoo model's own task, a named task, or (text models)
    the built-in prompts plus ``n`` (2) stdlib-docstring haystacks of 256 tokens; a model
    without a tokenizer: induction prompts."""
    from mechscope.tasks import induction, text_retrieval

    zoo = _zoo_task(model, n or 32, seed)
    if zoo is not None and task in (None, "retrieval"):
        return zoo
    tok = getattr(model, "tokenizer", None)
    n_ctx = int(model.cfg.n_ctx)
    if task is None and tok is None:
        task = "induction"
    if task in (None, "retrieval_text", "retrieval"):
        if tok is None:
            raise InputError("this model has no tokenizer; pass token ids or a zoo model's task")
        hay = text_retrieval(tok, n or 2, context_len=min(256, n_ctx), seed=seed, n_ctx=n_ctx)
        rows: list[Any] = hay.clean.tolist()  # ids with BOS; a tokenizer without BOS (BERT):
        if tok.bos_token_id is None:  # text, so the model adds its own [CLS] ... [SEP]
            rows = [tok.decode(r) for r in rows]
        return rows if task else [*PROMPTS, *rows]
    if task == "induction":
        vocab: dict[str, Any] = {"vocab": tok} if tok else {"d_vocab": int(model.cfg.d_vocab)}
        return [induction(n or 16, seq_len=min(32, (n_ctx - 1) // 2), seed=seed, **vocab)]
    raise InputError(f"unknown task {task!r} for sinks; choose retrieval_text, retrieval or "
                     "induction (or pass prompts)")  # fmt: skip


def default_run(model: Model, *, prompts: list[Any] | None = None, task: str | None = None,
                n: int | None = None, seed: int = 0, path: str = "auto", progress: bool = True
                ) -> AttentionSinks:  # fmt: skip
    """The CLI verb ``mechscope heads sinks``: :func:`find_sinks` over ``prompts``, a task, or the
    model's defaults (:func:`default_prompts`)."""
    _require_patterns(model)
    if prompts:
        return find_sinks(model, prompts, path=path, progress=progress)
    items = default_prompts(model, task=task, n=n, seed=seed)
    if items and isinstance(items[0], TaskBatch):
        items = [row[: int(m)].tolist() for b in items
                 for row, m in zip(b.clean, b.real_lengths, strict=True)]  # fmt: skip
    return find_sinks(model, items, path=path, progress=progress)
