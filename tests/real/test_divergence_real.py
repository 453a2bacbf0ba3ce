"""Head divergence and reinforcement on SmolLM2 with contexts that contradict what it knows."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits.divergence import (
    CONTRADICTIONS,
    context_task,
    default_run,
    evaluate_reinforcement,
    head_divergence,
    select_reinforced,
)
from mechscope.errors import InputError


def test_contradicting_context_divergence_and_reinforcement(smollm2) -> None:
    hd = default_run(smollm2, n=3, progress=False)
    assert hd.scores.shape == (30, 9)
    assert bool(torch.isfinite(hd.vhd).all()) and float(hd.scores.max()) > 0
    heads = select_reinforced(hd)
    assert heads and all(17 <= layer < 30 for layer, _ in heads)  # the last 13 of 30 layers
    res = evaluate_reinforcement(smollm2, context_task(smollm2, CONTRADICTIONS[:3]), heads,
                                 n_random=1, progress=False)  # fmt: skip
    print(res.to_frame().to_string())
    assert res.answer_prob[1] != res.answer_prob[0]


def test_a_segment_not_in_the_prompt_is_named(smollm2) -> None:
    with pytest.raises(InputError, match="Berlin is nice"):
        head_divergence(smollm2, "Context: Paris is nice.\nQuestion: Where?", "Berlin is nice",
                        progress=False)  # fmt: skip
    with pytest.raises(InputError, match="segment"):
        default_run(smollm2, prompts=["Context: a.\nQuestion: b"], progress=False)
