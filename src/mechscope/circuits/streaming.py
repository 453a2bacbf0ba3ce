"""Streaming vs retrieval heads, found as DuoAttention finds them (METHODS.md section 3).

DuoAttention (Xiao et al. 2024, code mit-han-lab/duo-attention) gives every key/value head a gate
``alpha`` in [0, 1] (initialised to 1) and mixes, per head, the output of full attention with the
output of *streaming* attention, which sees only the first ``sink`` keys and the last ``recent``
keys (the attention renormalised over them): ``alpha * full + (1 - alpha) * streaming``. The gates
are trained, model frozen, to keep the final hidden states of the answer tokens of passkey
(needle-in-a-haystack) prompts: loss = MSE(mixed, full) + ``l1`` * mean |alpha|, AdamW, gates
clamped to [0, 1] after every step. Heads whose gate stays high need the whole context (retrieval
heads); the others can run on a sink + recent window (streaming heads). The gates are binarised by
quantile: the top ``keep_full`` of the key/value heads stay full.

How mechscope does it. A head's output ``z = pattern @ V`` is linear in its pattern, so mixing the
outputs is mixing the patterns: one differentiable :class:`~mechscope.probes.Apply` per layer on
the ``patterns`` site (``[batch, head, query, key]``) writes ``alpha * p + (1 - alpha) *
streaming(p)``, and the gradient reaches the gates through it. On a grouped-query model (SmolLM2:
3 key/value heads per layer, 9 query heads) the query heads that share a key/value head share its
gate (``head = kv_head * group + i``, the ``repeat_kv`` layout of Hugging Face Llama). The hidden
state compared is the final-normed residual (``ln_final`` of the last layer's ``resid``), the one
DuoAttention compares (the output of ``LlamaModel``), at each prompt's ``answer_pos``; the MSE is
averaged over d_model and answer tokens as in DuoAttention's distillation loss.

Defaults, and where they differ from DuoAttention's (sink 128 + recent 256, 2,000 steps, contexts
of thousands of tokens; keep 25% full heads for MHA models, 50% for GQA models in the paper's
deployment): our contexts are a few hundred tokens, so the window is scaled down to ``sink=4,
recent=64`` (a window of 384 would cover the whole prompt and make every head trivially
streaming); ``steps=200`` (CPU budget) with a constant learning rate (DuoAttention warms up and
decays); ``keep_full=None`` picks 0.25 for multi-head and 0.5 for grouped-query models. Binarising
adds noise below 1e-6 (seeded) to break ties, as the reference does.

Caveats: a query whose window already covers every key it can see (``t < sink + recent``) has the
same streaming and full pattern, so it is left exactly as it is; short prompts therefore say little.

>>> import torch
>>> p = torch.full((1, 1, 4, 4), 0.25).tril()  # not a real pattern: shows the masking only
>>> streaming_pattern(p / p.sum(-1, keepdim=True), sink=1, recent=1)[0, 0].tolist()
[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.5, 0.0, 0.0, 0.5]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.circuits.attention import causal_mask
from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap
from mechscope.probes.interventions import Apply, Intervention, intervene
from mechscope.results import Provenance, Result
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model

__all__ = [
    "StreamingHeads",
    "binarise",
    "default_run",
    "gate_interventions",
    "mixed_pattern",
    "streaming_gates",
    "streaming_mask",
    "streaming_pattern",
]


# ---------------------------------------------------------------------------------------------
# the streaming pattern and the gated mix


def streaming_mask(pattern: Tensor, sink: int, recent: int) -> Tensor:
    """``[query, key]`` bool: the keys a streaming head sees (the first ``sink`` keys and the last
    ``recent`` keys up to and including the query itself, never a future key). The queries are the
    last ``query`` positions of a ``key``-long sequence, as in :func:`causal_mask`.

    >>> streaming_mask(torch.zeros(1, 1, 4, 4), sink=1, recent=2).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    """
    q, k = pattern.shape[-2:]
    t = torch.arange(q, device=pattern.device)[:, None] + (k - q)  # absolute query position
    j = torch.arange(k, device=pattern.device)[None, :]
    return causal_mask(pattern) & ((j < sink) | (j > t - recent))


def _window_covers(pattern: Tensor, sink: int, recent: int) -> Tensor:
    """``[query, 1]`` bool: the window holds every key the query can see (streaming == full)."""
    q, k = pattern.shape[-2:]
    t = torch.arange(q, device=pattern.device)[:, None] + (k - q)
    return t < sink + recent


def streaming_pattern(pattern: Float[Tensor, "batch head query key"], sink: int, recent: int
                      ) -> Float[Tensor, "batch head query key"]:  # fmt: skip
    """Attention restricted to the sink + recent keys and renormalised over them (the softmax
    over those keys only). Rows whose window covers every visible key are returned unchanged."""
    keep = streaming_mask(pattern, sink, recent)
    kept = pattern * keep
    renorm = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(pattern.dtype).tiny)
    return torch.where(_window_covers(pattern, sink, recent), pattern, renorm)


def mixed_pattern(pattern: Float[Tensor, "batch head query key"], gate: Float[Tensor, " head"],
                  sink: int, recent: int) -> Float[Tensor, "batch head query key"]:  # fmt: skip
    """``gate * pattern + (1 - gate) * streaming(pattern)``, per head (``gate = 1``: the pattern
    itself, bit for bit)."""
    g = gate.to(pattern.device).view(1, -1, 1, 1)
    full = pattern.float()
    # written as full + (1 - g) * (stream - full) so rows where stream == full stay exact
    return full + (1 - g) * (streaming_pattern(full, sink, recent) - full)


def gate_interventions(head_gates: Float[Tensor, "layer head"], sink: int, recent: int
                       ) -> list[Intervention]:  # fmt: skip
    """One :class:`~mechscope.probes.Apply` per layer on ``patterns`` mixing full and streaming
    attention with ``head_gates[layer]`` (differentiable in the gates).

    >>> [s.layer for s in gate_interventions(torch.ones(2, 3), sink=1, recent=2)]
    [0, 1]
    """

    def make(layer: int) -> Apply:
        return Apply(site="patterns", layer=layer,
                     fn=lambda p: mixed_pattern(p, head_gates[layer], sink, recent))  # fmt: skip

    return [make(layer) for layer in range(head_gates.shape[0])]


def binarise(gates: Tensor, keep_full: float, seed: int = 0) -> Tensor:
    """Bool mask of the gates kept full: those at or above the ``1 - keep_full`` quantile (ties
    broken by seeded noise below 1e-6, as DuoAttention's ``sparsify_attention_heads``).

    >>> binarise(torch.tensor([[0.1, 0.9], [0.5, 0.2]]), keep_full=0.25).tolist()
    [[False, True], [False, False]]
    """
    if not 0.0 <= keep_full <= 1.0:
        raise InputError(f"keep_full must be a share of heads in [0, 1], got {keep_full}")
    gen = torch.Generator().manual_seed(seed)
    noisy = gates.detach().double().cpu() + torch.rand(gates.shape, generator=gen).double() * 1e-6
    if keep_full <= 0:
        return torch.zeros_like(noisy, dtype=torch.bool)
    if keep_full >= 1:
        return torch.ones_like(noisy, dtype=torch.bool)
    threshold = torch.quantile(noisy.reshape(-1), 1.0 - keep_full)
    return noisy >= threshold


# ---------------------------------------------------------------------------------------------
# the result


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return np.asarray(rankdata(x), dtype=np.float64)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC (ties count half); None when one class is empty."""
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    r = _rank(scores)
    return float((r[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _as_scores(retrieval_scores: Any) -> np.ndarray:
    s = getattr(retrieval_scores, "scores", retrieval_scores)
    if isinstance(s, Tensor):
        s = s.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("retrieval_scores must be a RetrievalScores (with .scores) or a "
                         f"[layer, head] tensor/array, got {type(retrieval_scores).__name__}"
                         ) from None  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class StreamingHeads(Result):
    """DuoAttention gates: which heads need full attention (retrieval) and which a sink + recent
    window (streaming).

    Attributes:
        gates: the trained gate of every key/value head, ``[layer, kv_head]``, in [0, 1].
        head_gates: the gates expanded to query heads, ``[layer, head]``.
        loss_curve: total loss (MSE + l1 * mean |alpha|) before each step, ``[steps]``.
        mse_curve: the MSE term alone, ``[steps]``.
        full_heads: the binarised full-attention (retrieval) query heads, ``(layer, head)``.
        full_kv_heads: the same as key/value heads, ``(layer, kv_head)``.
        sink, recent, keep_full: the streaming window and the share of heads kept full.
        final_mse: the MSE with the trained gates after the last step.
    """

    kind = "streaming_heads"
    gates: Float[Tensor, "layer kv_head"]
    head_gates: Float[Tensor, "layer head"]
    loss_curve: Float[Tensor, " steps"]
    mse_curve: Float[Tensor, " steps"]
    full_heads: tuple[tuple[int, int], ...]
    full_kv_heads: tuple[tuple[int, int], ...]
    sink: int
    recent: int
    keep_full: float
    final_mse: float

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, head, kv_head, gate, full``, one row per query head."""
        n_layers, n_heads = self.head_gates.shape
        group = n_heads // self.gates.shape[1]
        full = set(self.full_heads)
        layers = np.repeat(np.arange(n_layers), n_heads)
        heads = np.tile(np.arange(n_heads), n_layers)
        return pd.DataFrame({
            "layer": layers, "head": heads, "kv_head": heads // group,
            "gate": self.head_gates.detach().to("cpu", torch.float64).reshape(-1).numpy(),
            "full": [(int(a), int(b)) in full for a, b in zip(layers, heads, strict=True)],
        })  # fmt: skip

    def figure(self, view: str = "gates") -> go.Figure:
        """``gates``: layer x head heatmap of the gates (query heads); ``kv``: the same per
        key/value head; ``loss``: the loss curve (total and MSE)."""
        if view == "gates":
            return layer_head_heatmap(self.head_gates, title=f"DuoAttention gate per head (1 = "
                                      f"full attention; streaming window {self.sink}+"
                                      f"{self.recent})", colorscale="Viridis")  # fmt: skip
        if view == "kv":
            return layer_head_heatmap(self.gates, title="DuoAttention gate per key/value head",
                                      colorscale="Viridis")  # fmt: skip
        if view == "loss":
            fig = go.Figure()
            steps = list(range(len(self.loss_curve)))
            fig.add_scatter(x=steps, y=self.loss_curve.tolist(), name="loss (MSE + L1)")
            fig.add_scatter(x=steps, y=self.mse_curve.tolist(), name="MSE of final hidden states")
            fig.update_layout(title="DuoAttention gate training", xaxis_title="step",
                              yaxis_title="loss", yaxis_type="log")  # fmt: skip
            return fig
        raise InputError(f"unknown view {view!r}; use 'gates', 'kv' or 'loss'")

    def payload(self) -> dict[str, Any]:
        """The CLI's ``--json`` body: ``scores`` (gates per query head), ``heads`` (the full
        heads), ``kv_gates``, ``sink``, ``recent``, ``keep_full``, ``loss_curve``, ``final_mse``."""

        def num(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {
            "scores": [[num(v) for v in row] for row in self.head_gates.tolist()],
            "heads": [[a, b] for a, b in self.full_heads],
            "kv_gates": [[num(v) for v in row] for row in self.gates.tolist()],
            "full_kv_heads": [[a, b] for a, b in self.full_kv_heads],
            "sink": self.sink, "recent": self.recent, "keep_full": self.keep_full,
            "loss_curve": [num(v) for v in self.loss_curve.tolist()],
            "final_mse": num(self.final_mse),
        }  # fmt: skip

    def agreement(self, retrieval_scores: Any, *, threshold: float = 0.1, k: int | None = None
                  ) -> dict[str, Any]:  # fmt: skip
        """How the gate ranking agrees with retrieval scores (Wu et al.) over query heads.

        Args:
            retrieval_scores: a ``RetrievalScores`` (its ``.scores``) or a ``[layer, head]``
                tensor/array.
            threshold: heads scoring above it are retrieval heads (METHODS.md: 0.1).
            k: size of the top-k sets compared (default: the number of full heads).

        Returns:
            ``spearman`` (rank correlation of gates and scores), ``auc`` (ROC-AUC of the gates
            against score > threshold; None when no head or every head passes), ``n_retrieval``,
            ``k``, ``topk_overlap`` (shared heads / k) and ``shared`` (the shared heads).

        >>> from mechscope.results import Provenance
        >>> r = StreamingHeads(provenance=Provenance.of(None), gates=torch.tensor([[0.9, 0.1]]),
        ...     head_gates=torch.tensor([[0.9, 0.1]]), loss_curve=torch.zeros(1),
        ...     mse_curve=torch.zeros(1), full_heads=((0, 0),), full_kv_heads=((0, 0),), sink=1,
        ...     recent=1, keep_full=0.5, final_mse=0.0)
        >>> a = r.agreement(torch.tensor([[0.5, 0.0]]))
        >>> a["auc"], a["topk_overlap"]
        (1.0, 1.0)
        """
        from scipy.stats import spearmanr

        s = _as_scores(retrieval_scores)
        g = self.head_gates.detach().to("cpu", torch.float64).numpy()
        if s.shape != g.shape:
            raise InputError(f"retrieval scores have shape {s.shape} but the gates are "
                             f"{g.shape} ([layer, head]); score the same model")  # fmt: skip
        sf, gf = s.reshape(-1), g.reshape(-1)
        k = len(self.full_heads) if k is None else int(k)
        if not 1 <= k <= gf.size:
            raise InputError(f"k must be in [1, {gf.size}] (the number of heads), got {k}")
        rho = spearmanr(gf, sf).statistic if np.ptp(gf) > 0 and np.ptp(sf) > 0 else float("nan")
        n_heads = g.shape[1]
        top_g = set(np.argsort(-gf, kind="stable")[:k].tolist())
        top_s = set(np.argsort(-sf, kind="stable")[:k].tolist())
        shared = sorted(top_g & top_s)
        return {
            "spearman": float(rho) if np.isfinite(rho) else None,
            "auc": _auc(sf > threshold, gf), "threshold": threshold,
            "n_retrieval": int((sf > threshold).sum()), "k": k,
            "topk_overlap": len(shared) / k,
            "shared": [[i // n_heads, i % n_heads] for i in shared],
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# training


def _batches(batches: TaskBatch | Sequence[TaskBatch]) -> list[TaskBatch]:
    out = [batches] if isinstance(batches, TaskBatch) else list(batches)
    if not out:
        raise InputError("no batches given; pass a TaskBatch (e.g. tasks.text_retrieval(...)) "
                         "or a non-empty list of them")  # fmt: skip
    for b in out:
        if not isinstance(b, TaskBatch):
            raise InputError(f"batches must be TaskBatch objects, got {type(b).__name__}; build "
                             "them with mechscope.tasks (retrieval, text_retrieval)")  # fmt: skip
    return out


class _Enough(Exception):
    """Raised by the hook that grabs the last residual, to skip the rest of the forward."""


def _final_hidden(model: Model, tokens: Tensor, positions: Tensor,
                  specs: list[Intervention]) -> Tensor:  # fmt: skip
    """Final-normed residual at ``positions`` (``[batch]``), under ``specs``, with gradients."""
    grabbed: list[Tensor] = []

    def grab(act: Tensor) -> Tensor:
        grabbed.append(act)
        raise _Enough  # the unembedding is not needed: stop the forward here

    last = int(model.cfg.n_layers) - 1
    try:
        with intervene(model, [*specs, Apply(site="resid", layer=last, fn=grab)]):
            model(tokens)
    except _Enough:
        pass
    if not grabbed:
        raise RuntimeError("the forward ended before the last layer's residual was reached")
    resid = grabbed[-1][torch.arange(tokens.shape[0], device=tokens.device), positions]
    ln = getattr(model, "ln_final", None)
    return (ln(resid) if ln is not None else resid).float()


def _check_args(sink: int, recent: int, steps: int, lr: float, l1: float) -> None:
    if not isinstance(sink, int) or sink < 0:
        raise InputError(f"sink must be a non-negative number of keys, got {sink!r}")
    if not isinstance(recent, int) or recent < 1:
        raise InputError(f"recent must be a positive number of keys (the query itself counts), "
                         f"got {recent!r}")  # fmt: skip
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive number of optimiser steps, got {steps!r}")
    if not lr > 0 or l1 < 0:
        raise InputError(f"lr must be > 0 and l1 >= 0, got lr={lr}, l1={l1}")


def streaming_gates(
    model: Model,
    batches: TaskBatch | Sequence[TaskBatch],
    *,
    sink: int = 4,
    recent: int = 64,
    steps: int = 200,
    lr: float = 0.02,
    l1: float = 0.05,
    keep_full: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> StreamingHeads:
    """Train DuoAttention gates on ``batches`` (the hidden states at each row's ``answer_pos``).

    Args:
        model: a model with a ``patterns`` hook (TransformerLens bridge, native or zoo).
        batches: needle-in-a-haystack batches (``tasks.text_retrieval`` / ``tasks.retrieval``);
            step ``i`` uses batch ``i % len(batches)``.
        sink, recent: the streaming window (first ``sink`` keys, last ``recent`` keys).
        steps: optimiser steps (DuoAttention: 2,000).
        lr: AdamW learning rate (no weight decay, as DuoAttention).
        l1: weight of the mean |alpha| penalty.
        keep_full: share of key/value heads kept full when binarising (None: 0.25 for multi-head,
            0.5 for grouped-query models, DuoAttention's deployment choices).
        seed: seeds the tie-breaking noise of the binarisation (training is deterministic).
        progress: show a progress bar.

    The model's weights are frozen while training (their ``requires_grad`` is restored after).
    """
    _check_args(sink, recent, steps, lr, l1)
    rows = _batches(batches)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    group = n_heads // n_kv
    keep = (0.25 if n_kv == n_heads else 0.5) if keep_full is None else float(keep_full)
    if not 0.0 <= keep <= 1.0:
        raise InputError(f"keep_full must be a share of heads in [0, 1], got {keep_full}")
    device = next(model.parameters()).device
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    gates = torch.ones(n_layers, n_kv, device=device, requires_grad=True)
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    mses: list[float] = []
    try:
        for p in params:
            p.requires_grad_(False)
        data = []
        with torch.no_grad():
            for b in rows:
                tokens, pos = b.clean.to(device), b.answer_pos.to(device)
                data.append((tokens, pos, _final_hidden(model, tokens, pos, []).detach()))
        for step in tqdm(range(steps), desc="DuoAttention gates", disable=not progress):
            tokens, pos, target = data[step % len(data)]
            head_gates = gates.repeat_interleave(group, dim=1)
            mixed = _final_hidden(model, tokens, pos, gate_interventions(head_gates, sink, recent))
            mse = (mixed - target).pow(2).mean()
            loss = mse + l1 * gates.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
            mses.append(float(mse.detach()))
        with torch.no_grad():
            head_gates = gates.repeat_interleave(group, dim=1)
            specs = gate_interventions(head_gates, sink, recent)
            final = [
                float((_final_hidden(model, t, p, specs) - y).pow(2).mean()) for t, p, y in data
            ]
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)
    kv = gates.detach().cpu().float()
    full_kv = binarise(kv, keep, seed)
    full_q = full_kv.repeat_interleave(group, dim=1)
    config = {"sink": sink, "recent": recent, "steps": steps, "lr": lr, "l1": l1,
              "keep_full": keep, "n_batches": len(rows), "n_prompts": sum(b.batch_size for b in rows),
              "seq_lens": sorted({b.seq_len for b in rows}), "tasks": sorted({b.task for b in rows}),
              "hidden": "ln_final(resid of the last layer) at answer_pos"}  # fmt: skip
    return StreamingHeads(
        provenance=Provenance.of(model, config, seed),
        gates=kv, head_gates=kv.repeat_interleave(group, dim=1),
        loss_curve=torch.tensor(losses), mse_curve=torch.tensor(mses),
        full_heads=tuple((int(a), int(b)) for a, b in full_q.nonzero().tolist()),
        full_kv_heads=tuple((int(a), int(b)) for a, b in full_kv.nonzero().tolist()),
        sink=sink, recent=recent, keep_full=keep, final_mse=float(np.mean(final)),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the default run


def _zoo_batches(model: Model, n: int | None, seed: int) -> list[TaskBatch] | None:
    from mechscope.models.loading import spec_of

    spec = spec_of(model) or ""
    if not spec.startswith("zoo:"):
        return None
    from mechscope.models.zoo import RECIPES
    from mechscope.models.zoo.data import EVAL_BATCHES

    recipe = RECIPES[spec.removeprefix("zoo:")]
    return list(EVAL_BATCHES[recipe.task](recipe, n or 44, seed))


def default_run(
    model: Model,
    *,
    prompts: list[str] | None = None,
    task: str | None = None,
    n: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> StreamingHeads:
    """What ``mechscope heads streaming`` runs.

    - ``prompts``: the hidden state of each prompt's last token is kept (one prompt per batch).
    - a zoo model (no prompts): its own evaluation batches (``zoo:retrieval``: needles at 11
      depths), 300 steps.
    - otherwise ``task`` ``"retrieval"`` (the default): ``n`` (default 4) stdlib-docstring
      haystacks of 256 tokens at depths spread over [0.1, 0.9], 2 per batch, 40 steps (keeps the
      SmolLM2 run around a minute on 2 cores; the experiment script trains longer).
    """
    from mechscope.probes.tokens import tokenize

    if task not in (None, "retrieval", "text_retrieval"):
        raise InputError(f"unknown task {task!r} for streaming heads; use 'retrieval' (needles in "
                         "a haystack) or pass prompts")  # fmt: skip
    if prompts:
        out = []
        for prompt in prompts:
            ids, lengths = tokenize(model, [prompt])
            z = torch.zeros(1, dtype=torch.long)
            out.append(TaskBatch(task="prompt", clean=ids, corrupt=ids, answer=z, corrupt_answer=z,
                                 answer_pos=lengths - 1, seed=seed, lengths=lengths))  # fmt: skip
        return streaming_gates(model, out, steps=40, seed=seed, progress=progress)
    zoo = _zoo_batches(model, n, seed)
    if zoo is not None:
        return streaming_gates(model, zoo, steps=300, seed=seed, progress=progress)
    if getattr(model, "tokenizer", None) is None:
        raise InputError("this model has no tokenizer and is not a zoo model; pass token-id "
                         "TaskBatches to streaming_gates instead")  # fmt: skip
    from mechscope.tasks import text_retrieval

    n = 4 if n is None else n
    if n < 1:
        raise InputError(f"n must be a positive number of prompts, got {n}")
    depths = np.linspace(0.1, 0.9, n)
    batches = [text_retrieval(model, 1, context_len=256, depth=float(d), seed=seed + i)
               for i, d in enumerate(depths)]  # fmt: skip
    merged = [_merge(batches[i : i + 2]) for i in range(0, n, 2)]
    return streaming_gates(model, merged, steps=40, seed=seed, progress=progress)


def _merge(parts: list[TaskBatch]) -> TaskBatch:
    """Equal-length batches as one (meta dropped)."""
    return TaskBatch(task=parts[0].task, clean=torch.cat([b.clean for b in parts]),
                     corrupt=torch.cat([b.corrupt for b in parts]),
                     answer=torch.cat([b.answer for b in parts]),
                     corrupt_answer=torch.cat([b.corrupt_answer for b in parts]),
                     answer_pos=torch.cat([b.answer_pos for b in parts]), seed=parts[0].seed)  # fmt: skip
