"""Batched head statistics: previous-token, duplicate-token, induction and sink scores of every head.

One traced forward per batch of prompts (the Tracer's ``patterns`` site) scores every head of
every layer at once; the scores are einsums over ``[batch, head, query, key]`` patterns, with no
Python loop over heads or prompts.

- ``previous_token``, ``duplicate_token``, ``induction``: TransformerLens's
  ``head_detector.detect_head`` exactly: its detection patterns (built from each prompt's
  tokens), its ``exclude_bos`` / ``exclude_current_token`` flags, its ``"mul"`` measure
  (attention on the pattern / all attention left after the exclusions) and its ``"abs"`` measure
  (``1 - round(sum |A - D| / n, 3)``), one score per prompt and their mean over prompts (TL runs a
  list of prompts one by one and averages). Prompts of different lengths are right-padded with
  an attention mask; only each prompt's own ``n x n`` block is scored, so a prompt's score does
  not depend on what it is batched with. ``target_rows_only=True`` leaves out the query rows whose
  detection pattern is empty (the first copy of ``R`` for induction), as the zoo's ground truth
  does, so a perfect induction head scores 1 instead of about one half.
- ``sink``: ACT's mean received attention per key, ``sum_i A[i, j] / (n - j)`` (averaged over the
  queries that can see key ``j``); keys scoring over 0.1 are sinks, and a head's score is the
  share of its attention the sink keys absorb (METHODS.md section 4).

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=16")
>>> stats = head_statistics(model, torch.tensor([[0, 1, 2, 3, 1, 2, 3]]), progress=False)
>>> sorted(stats.scores), tuple(stats.scores["induction"].shape)
(['duplicate_token', 'induction', 'previous_token', 'sink'], (2, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from mechscope.circuits.sinks import act_key_scores
from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap
from mechscope.probes.tokens import Prompts, tokenize
from mechscope.probes.tracer import Tracer
from mechscope.results import Provenance, Result
from mechscope.scale import Backend, as_backend
from mechscope.types import Model

__all__ = ["KINDS", "HeadStatistics", "default_run", "detection_patterns", "head_statistics"]

KINDS = ("previous_token", "duplicate_token", "induction", "sink")
DETECTOR_KINDS = ("previous_token", "duplicate_token", "induction")
SINK_THRESHOLD = 0.1
ErrorMeasure = Literal["mul", "abs"]


# -- detection patterns -------------------------------------------------------------------------


def detection_patterns(tokens: Tensor, lengths: Tensor, kinds: Sequence[str] = DETECTOR_KINDS
                       ) -> Tensor:  # fmt: skip
    """``[batch, kind, query, key]`` 0/1 patterns of TransformerLens's head detector, built for
    each right-padded row from its own ``lengths[b]`` tokens (zero outside that block).

    >>> detection_patterns(torch.tensor([[5, 7, 5, 7]]), torch.tensor([4]), ["induction"])[0, 0]
    tensor([[0., 0., 0., 0.],
            [0., 0., 0., 0.],
            [0., 1., 0., 0.],
            [0., 0., 1., 0.]])
    """
    _, n = tokens.shape
    real = torch.arange(n)[None, :] < lengths[:, None]  # [b, pos]
    block = real[:, :, None] & real[:, None, :]  # [b, q, k]
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    dup = (tokens[:, :, None] == tokens[:, None, :]) & (k < q) & block
    out = []
    for kind in kinds:
        if kind == "previous_token":
            pat = (k == q - 1).expand_as(dup) & block
        elif kind == "duplicate_token":
            pat = dup
        elif kind == "induction":  # dup shifted one key to the right: tok[q] == tok[k - 1], k <= q
            pat = torch.zeros_like(dup)
            pat[:, :, 1:] = (
                (tokens[:, :, None] == tokens[:, None, :-1]) & (k[:, 1:] <= q) & block[:, :, 1:]
            )
        else:
            raise InputError(f"no detection pattern for {kind!r}; choose from {DETECTOR_KINDS}")
        out.append(pat)
    return torch.stack(out, 1).float()


# -- per-batch scoring (vectorised over prompts, heads and kinds) --------------------------------


def _score_layer(pattern: Tensor, det: Tensor, keep: Tensor, block: Tensor, lengths: Tensor,
                 kinds: Sequence[str], error_measure: str, target_rows: Tensor | None
                 ) -> dict[str, Tensor]:  # fmt: skip
    """Scores ``kind -> [batch, head]`` of one layer's patterns ``[batch, head, q, k]``."""
    out: dict[str, Tensor] = {}
    det_kinds = [k for k in kinds if k in DETECTOR_KINDS]
    if det_kinds:
        order = [DETECTOR_KINDS.index(k) for k in det_kinds]
        d = det[:, order]  # [b, K, q, k]
        if error_measure == "mul":
            a = pattern * keep[:, None]  # exclusions (and padding) set to 0
            if target_rows is not None:  # [b, K, q]: rows with a target
                num = torch.einsum("bhqk,bjqk->bjh", a, d)
                den = torch.einsum("bhqk,bjq->bjh", a, target_rows[:, order].to(a.dtype))
            else:
                num = torch.einsum("bhqk,bjqk->bjh", a, d)
                den = a.sum((-1, -2))[:, None, :].expand_as(num)
            score = num / den
        else:
            diff = (pattern[:, None] - d[:, :, None]).abs() * keep[:, None, None]  # [b, K, h, q, k]
            if target_rows is not None:
                diff = diff * target_rows[:, order, None, :, None].to(diff.dtype)
            raw = diff.sum((-1, -2)).double() / lengths.to(diff.device)[:, None, None].double()
            score = 1.0 - torch.round(raw * 1000) / 1000
        for i, kind in enumerate(det_kinds):
            out[kind] = score[:, i].float()
    if "sink" in kinds:
        real = pattern * block[:, None]
        key_scores = act_key_scores(real, lengths)  # [b, h, k]
        received = real.sum(-2)  # [b, h, k]
        sink = (key_scores > SINK_THRESHOLD).to(real.dtype)
        out["sink"] = ((received * sink).sum(-1) / received.sum(-1)).float()
    return out


# -- the result ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadStatistics(Result):
    """Head statistics of every head over a set of prompts.

    Attributes:
        scores: ``kind -> [layer, head]``, the mean over prompts.
        per_prompt: ``kind -> [prompt, layer, head]`` (prompts in input order).
        lengths: each prompt's length in tokens.
        error_measure: ``"mul"`` or ``"abs"`` (the detector kinds).
        exclude_bos, exclude_current_token: TransformerLens's flags.
        target_rows_only: query rows with an empty detection pattern were left out.
    """

    kind = "head_statistics"
    scores: dict[str, Tensor]
    per_prompt: dict[str, Tensor]
    lengths: Tensor
    error_measure: str = "mul"
    exclude_bos: bool = False
    exclude_current_token: bool = False
    target_rows_only: bool = False

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, head`` and one column per kind."""
        first = next(iter(self.scores.values()))
        n_layers, n_heads = first.shape
        frame = pd.DataFrame({"layer": torch.arange(n_layers).repeat_interleave(n_heads).numpy(),
                              "head": torch.arange(n_heads).repeat(n_layers).numpy()})  # fmt: skip
        for kind, grid in self.scores.items():
            frame[kind] = grid.detach().double().reshape(-1).numpy()
        return frame

    def _kind(self, kind: str | None) -> str:
        if kind is None:
            return "induction" if "induction" in self.scores else next(iter(self.scores))
        if kind not in self.scores:
            raise InputError(f"no {kind!r} scores here; choose from {sorted(self.scores)}")
        return kind

    def figure(self, kind: str | None = None) -> go.Figure:  # type: ignore[override]
        """A layer x head heatmap of one kind (default: induction, if scored)."""
        kind = self._kind(kind)
        what = (
            "share of attention on sink keys" if kind == "sink" else f"{self.error_measure} score"
        )
        return layer_head_heatmap(self.scores[kind], title=f"{kind} ({what})", colorscale="Viridis")

    def heads(self, kind: str | None = None, threshold: float = 0.4) -> list[tuple[int, int]]:
        """Heads whose ``kind`` score exceeds ``threshold``, best first."""
        grid = self.scores[self._kind(kind)].detach().double()
        order = grid.reshape(-1).argsort(descending=True, stable=True).tolist()
        n_heads = grid.shape[1]
        return [
            (i // n_heads, i % n_heads) for i in order if float(grid.reshape(-1)[i]) > threshold
        ]

    def payload(self) -> dict[str, Any]:
        """The CLI's ``--json`` body: the induction grid (or the first kind's) as ``scores``, its
        heads over 0.4 as ``heads``, and every kind's grid under ``by_kind``."""
        kind = self._kind(None)

        def grid(t: Tensor) -> list[list[float | None]]:
            return [[None if v != v else float(v) for v in row] for row in t.double().tolist()]

        return {"kind": kind, "scores": grid(self.scores[kind]),
                "heads": [list(h) for h in self.heads(kind)],
                "by_kind": {k: grid(v) for k, v in self.scores.items()},
                "n_prompts": int(self.lengths.numel()), "lengths": self.lengths.tolist(),
                "error_measure": self.error_measure, "exclude_bos": self.exclude_bos,
                "exclude_current_token": self.exclude_current_token,
                "target_rows_only": self.target_rows_only}  # fmt: skip


# -- the analysis -------------------------------------------------------------------------------


def head_statistics(
    model: Model,
    prompts_or_tokens: Prompts,
    *,
    kinds: Sequence[str] = KINDS,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = "mul",
    target_rows_only: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    backend: str | Backend = "local",
    shard_size: int | None = None,
) -> HeadStatistics:
    """Score every head for each of ``kinds`` over the prompts (see the module docstring).

    Args:
        model: a bridge model with an attention-pattern hook.
        prompts_or_tokens: text (tokenized like ``model.to_tokens``, BOS included), token ids
            ``[batch, pos]`` (every row full length), lists of ids, or a TaskBatch.
        kinds: any of ``previous_token``, ``duplicate_token``, ``induction``, ``sink``.
        exclude_bos, exclude_current_token, error_measure: as in ``detect_head``.
        target_rows_only: leave out query rows whose detection pattern is empty.
        batch_size: prompts per forward (prompts are grouped by length to limit padding).
        progress: show a progress bar over batches.
        backend, shard_size: ``ray`` (or a :class:`~mechscope.scale.Backend`) runs shards of
            whole batches (``shard_size`` prompts, default 4 batches) on Ray workers; the result
            is the local one, bit for bit (:mod:`mechscope.scale.sweeps`).

    Raises:
        InputError: an unknown kind or error measure, a prompt shorter than 2 tokens or not
            shorter than the context (``detect_head``'s own limits), or a model without an
            attention-pattern hook.
    """
    from tqdm.auto import tqdm

    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InputError(f"unknown head kinds {bad or '(none given)'}; choose from {KINDS}")
    if error_measure not in ("mul", "abs"):
        raise InputError(f"error_measure must be 'mul' or 'abs', got {error_measure!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tokens, lengths = tokenize(model, prompts_or_tokens)
    n_ctx = int(model.cfg.n_ctx)
    short = [i for i, n in enumerate(lengths.tolist()) if not 1 < n < n_ctx]
    if short:
        raise InputError(f"prompts {short[:5]} have lengths {lengths[short[:5]].tolist()}; each "
                         f"prompt needs 2 to {n_ctx - 1} tokens (TransformerLens's detector limits)")  # fmt: skip
    config = {"kinds": list(kinds), "exclude_bos": exclude_bos, "error_measure": error_measure,
              "exclude_current_token": exclude_current_token, "target_rows_only": target_rows_only,
              "batch_size": batch_size, "n_prompts": int(len(lengths))}  # fmt: skip
    sharding = as_backend(backend, shard_size=shard_size)
    if sharding.sharded:
        from mechscope.scale.sweeps import head_statistics_sweep

        return head_statistics_sweep(  # type: ignore[no-any-return]
            model, tokens, lengths, backend=sharding, progress=progress,
            provenance=Provenance.of(model, config), kinds=kinds, exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token, error_measure=error_measure,
            target_rows_only=target_rows_only, batch_size=batch_size)  # fmt: skip
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    per: dict[str, Tensor] = {k: torch.zeros(len(lengths), n_layers, n_heads) for k in kinds}
    order = torch.argsort(lengths, stable=True)
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    det_kinds = [k for k in DETECTOR_KINDS if k in kinds]
    with Tracer(model, sites=("patterns",), batch_size=batch_size) as tracer:
        for idx in tqdm(chunks, desc="head statistics", unit="batch", disable=not progress,
                        leave=False):  # fmt: skip
            lens = lengths[idx]
            n = int(lens.max())
            toks = tokens[idx, :n]
            trace = tracer.run([row[:m].tolist() for row, m in zip(toks, lens.tolist(), strict=True)],
                               progress=False)  # fmt: skip
            real = torch.arange(n)[None, :] < lens[:, None]
            block = real[:, :, None] & real[:, None, :]
            keep = block.clone()
            if exclude_bos:
                keep[:, :, 0] = False
            if exclude_current_token:
                keep &= ~torch.eye(n, dtype=torch.bool)
            det = detection_patterns(toks, lens) if det_kinds else torch.zeros(0)
            rows = (det.sum(-1) > 0) if target_rows_only and det_kinds else None
            for layer in range(n_layers):
                pattern = trace.pattern(layer).float()
                got = _score_layer(pattern, det, keep.to(pattern.dtype), block.to(pattern.dtype), lens,
                                   kinds, error_measure, rows)  # fmt: skip
                for kind, value in got.items():
                    per[kind][idx, layer] = value.cpu()
    return HeadStatistics(
        provenance=Provenance.of(model, config), scores={k: v.mean(0) for k, v in per.items()},
        per_prompt=per, lengths=lengths, error_measure=error_measure, exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token, target_rows_only=target_rows_only)  # fmt: skip


def default_run(
    model: Model,
    *,
    prompts: list[str] | None = None,
    task: str | None = None,
    n: int | None = None,
    seed: int = 0,
    progress: bool = True,
    backend: str | Backend = "local",
    shard_size: int | None = None,
) -> HeadStatistics:
    """Head statistics on ``prompts``, or on ``n`` (default 16) ``[BOS] + R + R`` induction rows
    (R of 20 tokens on a tokenizer's vocabulary, or of a zoo/native model's ids); ``backend``
    and ``shard_size`` as in :func:`head_statistics`."""
    from mechscope.tasks.induction import induction

    if task not in (None, "induction"):
        raise InputError(
            f"head statistics run on the induction task or on --prompt; got task {task!r}"
        )
    if prompts:
        return head_statistics(model, prompts, progress=progress, backend=backend,
                               shard_size=shard_size)
    n_ctx = int(model.cfg.n_ctx)
    seq_len = max(3, min(20, (n_ctx - 2) // 2))
    if model.tokenizer is not None:
        b = induction(n or 16, seq_len=seq_len, vocab=model.tokenizer, seed=seed)
    else:
        b = induction(n or 16, seq_len=seq_len, d_vocab=int(model.cfg.d_vocab), seed=seed)
    rows = torch.cat([b.clean, b.answer[:, None]], 1)  # the full [BOS] R R
    return head_statistics(model, rows, progress=progress, backend=backend, shard_size=shard_size)
