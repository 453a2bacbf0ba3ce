"""Segment attention on SmolLM2: a context sentence found by its text in each prompt, and the
statistics path (no patterns) agreeing with the pattern path."""

from __future__ import annotations

import torch

from mechscope.circuits.divergence import CONTRADICTIONS, context_prompt
from mechscope.circuits.segment_mass import segment_attention


def test_smollm2_stats_path_equals_pattern_path_on_a_context(smollm2) -> None:
    rows = CONTRADICTIONS[:2]
    prompts = [context_prompt(c, q) for c, q, _, _ in rows]
    contexts = [c for c, _, _, _ in rows]
    pat = segment_attention(smollm2, prompts, contexts, path="patterns", progress=False)
    st = segment_attention(smollm2, prompts, contexts, path="stats", progress=False)
    assert (pat.attention_path["path"], st.attention_path["path"]) == ("patterns", "stats")
    assert pat.spans == st.spans and pat.mass.shape == (30, 9)
    for (s, e), n in zip(pat.spans, pat.lengths, strict=True):
        assert 0 < s < e < n  # after "Context:", before the question
    torch.testing.assert_close(st.prompt_mass, pat.prompt_mass, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(st.prompt_last_mass, pat.prompt_last_mass, atol=1e-4, rtol=1e-3)
    assert float(pat.mass.max()) > 0.1  # some head reads the context
