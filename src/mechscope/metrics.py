"""Metrics on next-token logits: what an analysis measures about a model's answer.

Every function here is pure and takes plain tensors: the model's logits ``[batch, pos, vocab]``,
the answer token ids ``[batch]``, the "wrong" (corrupt-prompt) answer ids ``[batch]`` and the
position ``[batch]`` whose next-token logits are scored, per row. Task batches
(:class:`mechscope.tasks.base.TaskBatch`) delegate to these functions, and patching code builds
its metric with :func:`make_metric`.

Probabilities and log-probabilities are computed in float32 whatever the logits' dtype, and so is
the logit difference (a bfloat16 difference of two large logits loses most of its digits).

The normalised patching effect (:func:`normalised_patching`) follows the convention of the
activation-patching literature (Wang et al. 2022, "Interpretability in the Wild"; Heimersheim &
Nanda 2024, "How to use and interpret activation patching"): the effect of a patched run on a
metric, rescaled so that the two unpatched runs sit at 0 and 1. When the clean and corrupt runs
do not differ on the metric there is nothing to normalise by, and the function raises
:class:`~mechscope.errors.InputError` rather than dividing by a tiny constant.

>>> import torch
>>> logits = torch.zeros(1, 2, 4)
>>> logits[0, 1, 2], logits[0, 1, 3] = 3.0, 1.0
>>> answer, wrong, pos = torch.tensor([2]), torch.tensor([3]), torch.tensor([1])
>>> logit_diff(logits, answer, wrong, pos)
tensor([2.])
>>> metric = make_metric("logit_diff", answer=answer, wrong=wrong, positions=pos)
>>> float(metric(logits))
2.0
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError

MetricKind = Literal["logit_diff", "prob", "logprob"]
Direction = Literal["denoise", "noise"]

#: The smallest |clean - corrupt| gap :func:`normalised_patching` accepts by default.
MIN_GAP = 1e-6


@runtime_checkable
class Metric(Protocol):
    """A scalar metric of a forward pass: ``logits [batch, pos, vocab] -> scalar tensor``.

    Patching code calls one of these on every patched run; :func:`make_metric` builds them.
    """

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, ""]: ...


def _check_rows(logits: Tensor, **rows: Tensor | None) -> None:
    """Raise InputError unless ``logits`` is [batch, pos, vocab] and each row tensor is [batch]."""
    if logits.ndim != 3:
        raise InputError(
            f"logits must be [batch, pos, vocab], got shape {tuple(logits.shape)}; "
            "pass the model's full output, not the logits at one position"
        )
    batch = logits.shape[0]
    for name, t in rows.items():
        if t is not None and tuple(t.shape) != (batch,):
            raise InputError(
                f"{name} must have shape ({batch},) to match the logits' batch, "
                f"got {tuple(t.shape)}"
            )


def _check_ids(name: str, ids: Tensor, size: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < -size or int(ids.max()) >= size):
        raise InputError(
            f"{name} has values in [{int(ids.min())}, {int(ids.max())}] but the logits have "
            f"{size} {what}"
        )


def answer_logits(
    logits: Float[Tensor, "batch pos vocab"], positions: Int[Tensor, " batch"]
) -> Float[Tensor, "batch vocab"]:
    """The next-token logits at each row's own position.

    Args:
        logits: the model's output.
        positions: for row ``i``, the position whose logits are taken (negative counts from the
            end, as in Python indexing).

    Returns:
        ``logits[i, positions[i]]`` for every row ``i``, in the logits' dtype.

    Raises:
        InputError: wrong shapes, or a position outside the sequence.

    >>> logits = torch.arange(12.0).reshape(2, 3, 2)
    >>> answer_logits(logits, torch.tensor([0, 2]))
    tensor([[ 0.,  1.],
            [10., 11.]])
    """
    _check_rows(logits, positions=positions)
    _check_ids("positions", positions, logits.shape[1], "positions")
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, positions.to(logits.device)]


def _token_values(values: Tensor, tokens: Tensor) -> Tensor:
    """``values[i, tokens[i]]`` for ``values [batch, vocab]``."""
    _check_ids("token ids", tokens, values.shape[-1], "vocabulary entries")
    return values.gather(-1, tokens.to(values.device)[:, None])[:, 0]


def logit_diff(
    logits: Float[Tensor, "batch pos vocab"],
    answer: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    positions: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """``logit(answer) - logit(wrong)`` at each row's position, in float32.

    Positive when the model prefers the answer. ``wrong`` is usually the answer the corrupt
    prompt calls for.

    >>> logits = torch.zeros(2, 1, 3)
    >>> logits[0, 0] = torch.tensor([3.0, 1.0, 0.0])
    >>> logits[1, 0] = torch.tensor([0.0, 0.5, 2.0])
    >>> logit_diff(logits, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 0]))
    tensor([ 2.0000, -1.5000])
    """
    _check_rows(logits, answer=answer, wrong=wrong, positions=positions)
    last = answer_logits(logits, positions).float()
    return _token_values(last, answer) - _token_values(last, wrong)


def answer_logprob(
    logits: Float[Tensor, "batch pos vocab"],
    answer: Int[Tensor, " batch"],
    positions: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """``log p(answer)`` at each row's position (log-softmax over the vocabulary, in float32).

    >>> logits = torch.zeros(1, 1, 4)
    >>> answer_logprob(logits, torch.tensor([1]), torch.tensor([0]))
    tensor([-1.3863])
    """
    _check_rows(logits, answer=answer, positions=positions)
    return _token_values(answer_logits(logits, positions).float().log_softmax(-1), answer)


def answer_prob(
    logits: Float[Tensor, "batch pos vocab"],
    answer: Int[Tensor, " batch"],
    positions: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """``p(answer)`` at each row's position (softmax over the vocabulary, in float32).

    >>> logits = torch.zeros(1, 1, 4)
    >>> answer_prob(logits, torch.tensor([1]), torch.tensor([0]))
    tensor([0.2500])
    """
    _check_rows(logits, answer=answer, positions=positions)
    return _token_values(answer_logits(logits, positions).float().softmax(-1), answer)


def normalised_patching(
    value: Float[Tensor, "*shape"] | float,
    clean: Float[Tensor, ""] | float,
    corrupt: Float[Tensor, ""] | float,
    direction: Direction,
    *,
    min_gap: float = MIN_GAP,
) -> Float[Tensor, "*shape"] | float:
    """A patched run's metric rescaled between the clean and the corrupt run.

    ``denoise`` (a clean activation patched into the corrupt run) is
    ``(value - corrupt) / (clean - corrupt)``: 0 at the corrupt baseline, 1 when the patch
    restores the clean metric. ``noise`` (a corrupt activation patched into the clean run) is
    ``(clean - value) / (clean - corrupt)``: 0 at the clean baseline, 1 when the patch does as
    much damage as corrupting the whole prompt. Both are exact at their end points, in the dtype
    of ``value``.

    Args:
        value: the metric of the patched run(s), a float or a tensor of any shape (e.g. one value
            per ``[layer, head]``).
        clean: the metric of the clean run.
        corrupt: the metric of the corrupt run.
        direction: ``"denoise"`` or ``"noise"``.
        min_gap: the smallest ``|clean - corrupt|`` that is accepted.

    Returns:
        The normalised effect, a float for a float ``value``, else a tensor of ``value``'s shape.

    Raises:
        InputError: ``|clean - corrupt| < min_gap`` (the corruption does not change the metric,
            so no effect can be normalised: choose a corruption that changes the answer), a
            non-finite baseline, or an unknown direction.

    >>> normalised_patching(1.5, clean=2.0, corrupt=1.0, direction="denoise")
    0.5
    >>> normalised_patching(torch.tensor([1.0, 2.0]), 2.0, 1.0, "noise")
    tensor([1., 0.])
    """
    if direction not in ("denoise", "noise"):
        raise InputError(f"unknown patching direction {direction!r}; use 'denoise' or 'noise'")
    c, k = float(clean), float(corrupt)
    if not (math.isfinite(c) and math.isfinite(k)):
        raise InputError(f"the clean ({c}) and corrupt ({k}) metrics must be finite")
    if abs(c - k) < min_gap:
        raise InputError(
            f"the clean ({c:.6g}) and corrupt ({k:.6g}) metrics differ by less than {min_gap:g}, "
            "so the patching effect cannot be normalised; use a corruption that changes the "
            "answer (or compare raw metric values)"
        )
    if isinstance(value, Tensor):
        # Baselines in value's dtype, so value == clean gives exactly 1 and value == corrupt 0.
        ct = torch.as_tensor(c, dtype=value.dtype, device=value.device)
        kt = torch.as_tensor(k, dtype=value.dtype, device=value.device)
        num = value - kt if direction == "denoise" else ct - value
        return num / (ct - kt)
    v = float(value)
    return (v - k) / (c - k) if direction == "denoise" else (c - v) / (c - k)


def make_metric(
    kind: MetricKind,
    *,
    answer: Int[Tensor, " batch"],
    positions: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"] | None = None,
) -> Metric:
    """A :class:`Metric`: the batch mean of a per-row metric of the answer.

    Args:
        kind: ``"logit_diff"`` (needs ``wrong``), ``"prob"`` or ``"logprob"`` of the answer.
        answer: answer token ids, per row.
        positions: the scored position, per row.
        wrong: the competing token ids, per row (for ``logit_diff``).

    Raises:
        InputError: an unknown kind, ``logit_diff`` without ``wrong``, or rows of different
            lengths.

    >>> m = make_metric("prob", answer=torch.tensor([0]), positions=torch.tensor([0]))
    >>> float(m(torch.zeros(1, 1, 2)))
    0.5
    """
    if kind not in ("logit_diff", "prob", "logprob"):
        raise InputError(f"unknown metric {kind!r}; use 'logit_diff', 'prob' or 'logprob'")
    if kind == "logit_diff" and wrong is None:
        raise InputError("the logit_diff metric needs the wrong-answer ids (wrong=...)")
    if answer.ndim != 1:
        raise InputError(f"answer must be [batch], got shape {tuple(answer.shape)}")
    for name, t in (("positions", positions), ("wrong", wrong)):
        if t is not None and t.shape != answer.shape:
            raise InputError(
                f"answer, positions and wrong must all be [batch]; answer has shape "
                f"{tuple(answer.shape)} but {name} has {tuple(t.shape)}"
            )
    if wrong is not None and kind == "logit_diff":
        other = wrong

        def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, ""]:
            return logit_diff(logits, answer, other, positions).mean()

    elif kind == "prob":

        def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, ""]:
            return answer_prob(logits, answer, positions).mean()

    else:

        def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, ""]:
            return answer_logprob(logits, answer, positions).mean()

    return metric


__all__ = [
    "MIN_GAP",
    "Direction",
    "Metric",
    "MetricKind",
    "answer_logits",
    "answer_logprob",
    "answer_prob",
    "logit_diff",
    "make_metric",
    "normalised_patching",
]
