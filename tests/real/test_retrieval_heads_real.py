"""Retrieval heads on SmolLM2-135M: two short passcode needles in the stdlib-docstring haystack,
scored through the engine's key/value cache (its gate against the bridge passes; engine == hooks
is pinned on native/zoo models in tests/unit/test_retrieval_heads.py)."""

from __future__ import annotations

from mechscope.circuits.retrieval import retrieval_scores
from mechscope.tasks import text_retrieval


def test_smollm2_retrieval_scores_on_short_haystacks(smollm2):
    batch = text_retrieval(smollm2, 2, context_len=256, depth=0.5, seed=0)
    r = retrieval_scores(smollm2, batch, progress=False)
    assert r.scores.shape == (30, 9)
    assert r.work["path"] == "engine", r.work
    assert r.needle_len.tolist() == [4, 4]  # the four digits (the lone space ends the prompt)
    assert all(len(g) == 4 for g in r.generations)
    if r.n_answered:
        assert (r.scores > 0).any() and r.heads
        assert 0 < r.share_above() < 0.5
    gate = r.work["gate"]  # the engine was checked against the bridge on this batch
    assert gate["argmax_mismatch"] == 0 and gate["logit_diff"] < 1e-2
