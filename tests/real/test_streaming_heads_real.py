"""Real-tier test of DuoAttention gates (mechscope.circuits.streaming) on SmolLM2-135M: grouped
query attention (30 layers, 9 query heads sharing 3 key/value heads), a few steps on one short
needle-in-a-haystack prompt."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits.streaming import streaming_gates
from mechscope.tasks import text_retrieval

pytestmark = pytest.mark.real


def test_smollm2_gates_train_per_kv_head(smollm2) -> None:
    batch = text_retrieval(smollm2, 1, context_len=64, depth=0.3, seed=0)
    before = [p.requires_grad for p in smollm2.parameters()]
    res = streaming_gates(smollm2, batch, sink=4, recent=16, steps=3, progress=False)
    assert res.gates.shape == (30, 3) and res.head_gates.shape == (30, 9)
    assert bool(((res.gates >= 0) & (res.gates <= 1)).all())
    # query heads 3g..3g+2 share key/value head g (Hugging Face repeat_kv layout)
    assert torch.equal(res.head_gates, res.gates.repeat_interleave(3, dim=1))
    assert float(res.loss_curve[-1]) < float(res.loss_curve[0])
    assert float(res.mse_curve[-1]) > 0  # the window is shorter than the prompt: gates matter
    assert len(res.full_heads) == 3 * round(0.5 * 90)  # GQA: half the key/value heads kept full
    assert [p.requires_grad for p in smollm2.parameters()] == before
    assert all(p.grad is None for p in smollm2.parameters())
