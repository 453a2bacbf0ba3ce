"""Metrics on logits, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from jaxtyping import TypeCheckError

from mechscope.errors import InputError
from mechscope.metrics import (
    Metric,
    answer_logits,
    answer_logprob,
    answer_prob,
    logit_diff,
    make_metric,
    normalised_patching,
)

BAD_INPUT = (InputError, TypeCheckError)


def two_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 is scored at position 1, row 1 at position 2; every other position holds decoys
    that would give different answers if the wrong position were read."""
    logits = torch.full((2, 3, 5), 7.0)  # decoys: large values everywhere else
    logits[0, 1] = torch.tensor([0.0, 3.0, 1.0, 0.0, 0.0])  # answer 1, wrong 2 -> 2.0
    logits[1, 2] = torch.tensor([0.5, 0.0, 0.0, 4.0, 0.0])  # answer 0, wrong 3 -> -3.5
    logits[0, 2, 1] = -9.0  # reading row 1's position for row 0 gives a different value
    logits[1, 1, 0] = 9.0
    answer, wrong, pos = torch.tensor([1, 0]), torch.tensor([2, 3]), torch.tensor([1, 2])
    return logits, answer, wrong, pos


def test_logit_diff_is_answer_minus_wrong_at_each_rows_position():
    logits, answer, wrong, pos = two_rows()
    assert logit_diff(logits, answer, wrong, pos).tolist() == [2.0, -3.5]
    # swapping answer and wrong flips the sign: a reversed implementation fails the line above
    assert logit_diff(logits, wrong, answer, pos).tolist() == [-2.0, 3.5]


def test_positions_are_per_row():
    logits, answer, wrong, pos = two_rows()
    assert answer_logits(logits, pos).tolist() == [[0.0, 3.0, 1.0, 0.0, 0.0],
                                                   [0.5, 0.0, 0.0, 4.0, 0.0]]
    # the same position for both rows reads different logits
    assert logit_diff(logits, answer, wrong, torch.tensor([1, 1])).tolist() == [2.0, 9.0 - 7.0]
    # negative positions count from the end
    assert torch.equal(answer_logits(logits, torch.tensor([-2, -1])), answer_logits(logits, pos))


def test_prob_and_logprob_by_hand():
    logits = torch.zeros(2, 2, 3, dtype=torch.float16)
    logits[0, 0] = torch.tensor([1.0, 2.0, 3.0])
    logits[1, 1] = torch.tensor([0.0, -1.0, 2.0])
    answer, pos = torch.tensor([2, 1]), torch.tensor([0, 1])
    z0 = math.exp(1) + math.exp(2) + math.exp(3)
    z1 = math.exp(0) + math.exp(-1) + math.exp(2)
    expected = [math.exp(3) / z0, math.exp(-1) / z1]
    prob = answer_prob(logits, answer, pos)
    assert prob.dtype == torch.float32
    assert prob.tolist() == pytest.approx(expected, rel=1e-6)
    logprob = answer_logprob(logits, answer, pos)
    assert logprob.dtype == torch.float32
    assert logprob.tolist() == pytest.approx([math.log(p) for p in expected], rel=1e-6)


def test_logit_diff_is_float32_for_half_logits():
    logits = torch.zeros(1, 1, 2, dtype=torch.bfloat16)
    logits[0, 0] = torch.tensor([3.0, 1.0])
    out = logit_diff(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    assert out.dtype == torch.float32 and out.tolist() == [2.0]


@pytest.mark.parametrize(("clean", "corrupt"), [(2.0, 1.0), (0.1, 0.7), (-3.3, 4.9)])
def test_normalised_patching_end_points_are_exact(clean, corrupt):
    assert normalised_patching(corrupt, clean, corrupt, "denoise") == 0.0
    assert normalised_patching(clean, clean, corrupt, "denoise") == 1.0
    assert normalised_patching(clean, clean, corrupt, "noise") == 0.0
    assert normalised_patching(corrupt, clean, corrupt, "noise") == 1.0
    mid = (clean + corrupt) / 2
    assert normalised_patching(mid, clean, corrupt, "denoise") == pytest.approx(0.5)
    # tensors of any shape, baselines as 0-d tensors, float32 end points still exact
    value = torch.tensor([[clean, corrupt], [corrupt, clean]], dtype=torch.float32)
    den = normalised_patching(value, torch.tensor(clean), torch.tensor(corrupt), "denoise")
    noi = normalised_patching(value, clean, corrupt, "noise")
    assert den.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert noi.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_normalised_patching_direction_of_effects():
    # a patch that overshoots the clean metric scores above 1; one that hurts scores below 0
    assert normalised_patching(3.0, 2.0, 1.0, "denoise") == 2.0
    assert normalised_patching(0.0, 2.0, 1.0, "denoise") == -1.0
    assert normalised_patching(0.5, 2.0, 1.0, "noise") == 1.5


def test_normalised_patching_refuses_a_zero_gap():
    with pytest.raises(InputError, match="cannot be normalised"):
        normalised_patching(1.0, 1.0, 1.0, "denoise")
    with pytest.raises(InputError, match="cannot be normalised"):
        normalised_patching(1.0, 1.0, 1.0 + 1e-9, "noise")
    with pytest.raises(InputError, match="cannot be normalised"):
        normalised_patching(1.0, 1.0, 1.5, "noise", min_gap=1.0)
    with pytest.raises(InputError, match="finite"):
        normalised_patching(1.0, float("nan"), 0.0, "noise")
    with pytest.raises(BAD_INPUT):
        normalised_patching(1.0, 2.0, 0.0, "sideways")  # type: ignore[arg-type]


def test_make_metric_means_over_the_batch():
    logits, answer, wrong, pos = two_rows()
    ld = make_metric("logit_diff", answer=answer, wrong=wrong, positions=pos)
    assert isinstance(ld, Metric)
    assert float(ld(logits)) == pytest.approx((2.0 - 3.5) / 2)
    rows = answer_logits(logits, pos).double()
    p = [math.exp(rows[i, a]) / sum(math.exp(v) for v in rows[i].tolist())
         for i, a in enumerate(answer.tolist())]
    prob = make_metric("prob", answer=answer, positions=pos)
    logprob = make_metric("logprob", answer=answer, positions=pos, wrong=wrong)
    assert float(prob(logits)) == pytest.approx(sum(p) / 2, rel=1e-6)
    assert float(logprob(logits)) == pytest.approx(sum(math.log(x) for x in p) / 2, rel=1e-6)
    assert ld(logits).shape == ()


def test_make_metric_refuses_bad_requests():
    a, p = torch.tensor([0, 1]), torch.tensor([0, 0])
    with pytest.raises(BAD_INPUT):
        make_metric("accuracy", answer=a, positions=p)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="wrong"):
        make_metric("logit_diff", answer=a, positions=p)
    with pytest.raises(BAD_INPUT):
        make_metric("prob", answer=a, positions=torch.tensor([0]))


def test_bad_shapes_and_out_of_range_ids_are_refused():
    logits, answer, wrong, pos = two_rows()
    with pytest.raises(BAD_INPUT):
        logit_diff(logits, answer[:1], wrong, pos)
    with pytest.raises(BAD_INPUT):
        answer_logits(logits[:, 0], pos)
    with pytest.raises(InputError, match="positions"):
        answer_logits(logits, torch.tensor([0, 3]))
    with pytest.raises(InputError, match="vocabulary"):
        answer_prob(logits, torch.tensor([0, 5]), pos)
