"""The task contract: clean/corrupt token batches with answers and a metric.

Every generator in :mod:`mechscope.tasks` returns a :class:`TaskBatch`. Clean and corrupt rows
always have the same length (so a corrupt activation can be patched into a clean run position
by position), the corrupt prompt calls for a different answer, and the same seed gives the same
batch.

Padding has ONE rule in mechscope, used by the task generators and by the tracer alike: rows of
unequal length are padded on the right (:func:`right_pad`) with :func:`pad_id` (the tokenizer's
``pad_token_id``, else 0), and the real length of every row travels with it
(``TaskBatch.lengths``; the tracer builds its attention mask from it). With right padding the
positions before a row's end are unaffected by the padding in a causal model, so a row is scored
at its own ``answer_pos`` (``lengths - 1`` for every generator here: the answer is the next token
after the prompt).

>>> right_pad([[5, 6, 7], [8]], pad_id(None))
tensor([[5, 6, 7],
        [8, 0, 0]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope import metrics
from mechscope.errors import InputError
from mechscope.metrics import MetricKind


def pad_id(tok: Any) -> int:
    """The id rows are right-padded with: ``tok.pad_token_id`` when it is set, else 0.

    ``tok`` is a Hugging Face tokenizer, an object with a ``.tokenizer`` (a model), or None.
    """
    if tok is not None and not hasattr(tok, "pad_token_id"):
        tok = getattr(tok, "tokenizer", None)
    value = getattr(tok, "pad_token_id", None)
    return int(value) if value is not None else 0


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> Int[Tensor, "batch pos"]:
    """Stack rows of unequal length, padding on the right with ``pad``."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """A batch of clean/corrupt prompts with the answers they call for.

    Attributes:
        task: name of the generator (``"induction"``, ``"retrieval"``, ...).
        clean: clean token ids.
        corrupt: corrupt token ids, same shape as ``clean``.
        answer: the token the clean prompt calls for at ``answer_pos``.
        corrupt_answer: the token the corrupt prompt calls for (the "wrong" answer of a logit
            difference).
        answer_pos: the position whose next-token logits are scored, per row.
        seed: the seed that generated the batch.
        meta: generator-specific details (depths, spans, names, ...), JSON-serialisable.
        lengths: the real (unpadded) length of each row, the same for clean and corrupt;
            None (the default) means every row is full length, and is replaced by that tensor.
            ``answer_pos < lengths`` always holds.
    """

    task: str
    clean: Int[Tensor, "batch pos"]
    corrupt: Int[Tensor, "batch pos"]
    answer: Int[Tensor, " batch"]
    corrupt_answer: Int[Tensor, " batch"]
    answer_pos: Int[Tensor, " batch"]
    seed: int
    meta: Mapping[str, Any] = field(default_factory=dict)
    lengths: Int[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        if self.clean.ndim != 2:
            raise InputError(f"clean must be [batch, pos], got shape {tuple(self.clean.shape)}")
        if self.clean.shape != self.corrupt.shape:
            raise InputError(
                f"clean and corrupt must have the same shape, got {tuple(self.clean.shape)} and "
                f"{tuple(self.corrupt.shape)}; pad or trim them to equal length"
            )
        b = self.clean.shape[0]
        for name in ("answer", "corrupt_answer", "answer_pos"):
            t = getattr(self, name)
            if t.shape != (b,):
                raise InputError(f"{name} must have shape ({b},), got {tuple(t.shape)}")
        if b == 0 or self.clean.shape[1] == 0:
            raise InputError("a task batch needs at least one prompt of at least one token")
        if self.lengths is None:
            object.__setattr__(self, "lengths", torch.full((b,), self.clean.shape[1]))
        lengths = self.real_lengths
        if lengths.shape != (b,) or lengths.dtype.is_floating_point:
            raise InputError(f"lengths must be ({b},) integers, got {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > self.clean.shape[1]).any()):
            raise InputError(
                f"lengths must lie in [1, {self.clean.shape[1]}] (the padded width), "
                f"got {lengths.tolist()}"
            )
        if bool((self.answer_pos < 0).any()) or bool((self.answer_pos >= lengths).any()):
            raise InputError(
                f"answer_pos {self.answer_pos.tolist()} must lie inside each row's real length "
                f"{lengths.tolist()}; a row is scored at a real token, never at padding"
            )

    @property
    def real_lengths(self) -> Int[Tensor, " batch"]:
        """``lengths`` as a tensor (never None once the batch is built)."""
        assert self.lengths is not None  # set in __post_init__
        return self.lengths

    @property
    def batch_size(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def answer_logits(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch vocab"]:
        """The logits at each row's ``answer_pos``."""
        return metrics.answer_logits(logits, self.answer_pos)

    def logit_diff(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """logit(answer) - logit(corrupt_answer) at ``answer_pos``, per row (float32)."""
        return metrics.logit_diff(logits, self.answer, self.corrupt_answer, self.answer_pos)

    def answer_prob(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """p(answer) at ``answer_pos``, per row."""
        return metrics.answer_prob(logits, self.answer, self.answer_pos)

    def metric_fn(self, kind: MetricKind = "logit_diff") -> metrics.Metric:
        """This batch's metric as a function ``logits -> scalar`` (batch mean), e.g. for
        :func:`mechscope.probes.trace_with_grad`; see :func:`mechscope.metrics.make_metric`."""
        return metrics.make_metric(kind, answer=self.answer, positions=self.answer_pos,
                                   wrong=self.corrupt_answer)

    def metric(
        self, logits: Float[Tensor, "batch pos vocab"], kind: MetricKind = "logit_diff"
    ) -> Float[Tensor, ""]:
        """The batch mean of a metric: ``logit_diff``, ``prob`` or ``logprob`` of the answer."""
        return self.metric_fn(kind)(logits)

    def accuracy(self, logits: Float[Tensor, "batch pos vocab"]) -> float:
        """Fraction of rows whose top-1 prediction at ``answer_pos`` is ``answer``."""
        pred = self.answer_logits(logits).argmax(-1)
        return float((pred == self.answer.to(pred.device)).float().mean())
