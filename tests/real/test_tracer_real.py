"""Real-tier tests of the tracer on SmolLM2 (grouped-query attention: 9 query heads, 3 KV heads)
and MiniLM (BERT): attention sites against the model's own hooks and their defining properties,
tokenization without silent truncation, the memory budget, and a ragged text task."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope.errors import InputError
from mechscope.probes import hooked, tokenize, trace
from mechscope.tasks import ioi

pytestmark = pytest.mark.real

LAYERS = (0, 17)


def test_smollm2_attention_sites(smollm2):
    m = smollm2
    assert (m.cfg.n_heads, m.cfg.n_key_value_heads, m.cfg.d_head) == (9, 3, 64)
    tokens = m.to_tokens(["The capital of France is Paris, and the capital of Italy is"])
    sites = ("attn_scores", "patterns", "q", "k", "v", "heads")
    tr = trace(m, tokens, sites=sites, layers=LAYERS, progress=False)
    _, cache = m.run_with_cache(tokens)
    pos = tokens.shape[1]
    causal = torch.tril(torch.ones(pos, pos, dtype=torch.bool))
    kv_of = torch.arange(9) // 3  # query head h reads kv head h // 3 (repeat_interleave)
    for layer in LAYERS:
        for site in ("attn_scores", "q", "k", "v"):
            torch.testing.assert_close(tr.get(site, layer), cache[f"blocks.{layer}.attn.hook_{site}"])
        assert tr.k(layer).shape == tr.v(layer).shape == (1, pos, 3, 64)
        assert tr.q(layer).shape == (1, pos, 9, 64)
        s, p = tr.attn_scores(layer), tr.pattern(layer)
        torch.testing.assert_close(s.softmax(-1), p, atol=1e-5, rtol=1e-4)
        q = cache[f"blocks.{layer}.attn.hook_rot_q"]
        k = cache[f"blocks.{layer}.attn.hook_rot_k"]
        ref = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv_of]) / math.sqrt(64)
        torch.testing.assert_close(s[:, :, causal], ref[:, :, causal], atol=1e-3, rtol=1e-4)
        assert float(s[:, :, ~causal].max()) < -1e30
        z = torch.einsum("bhqk,bkhd->bqhd", p, tr.v(layer)[:, :, kv_of])
        torch.testing.assert_close(z, tr.heads(layer), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_text_is_tokenized_like_to_tokens(name, request):
    m = request.getfixturevalue(name)
    prompts = ["Hello world", "The quick brown fox jumps over the lazy dog."]
    tokens, lengths = tokenize(m, prompts)
    for i, text in enumerate(prompts):
        ref = m.to_tokens(text, move_to_device=False)[0].cpu()
        assert tokens[i, : lengths[i]].tolist() == ref.tolist()
    if name == "minilm":
        assert tokens[0, 0] == m.tokenizer.cls_token_id and tokens[0, lengths[0] - 1] == m.tokenizer.sep_token_id
    else:
        assert tokens[0, 0] == m.tokenizer.bos_token_id


def test_over_long_prompt_is_refused_before_any_forward(minilm, smollm2):
    forwards = []
    long_text = "word " * 700
    with (
        hooked(minilm, [("blocks.0.hook_resid_pre", lambda act, hook: forwards.append(1))], role="read"),
        pytest.raises(InputError, match=r"prompt 0 has \d+ tokens but the model's context is 512"),
    ):
        trace(minilm, long_text, sites=("resid",), progress=False)
    assert forwards == []
    assert smollm2.cfg.n_ctx == 8192
    tokens = torch.randint(0, 1000, (1, 8192))
    with (
        hooked(smollm2, [("blocks.0.hook_resid_pre", lambda act, hook: forwards.append(1))], role="read"),
        pytest.raises(InputError, match=r"patterns: .*30 layers .*out_dir="),
    ):
        trace(smollm2, tokens, sites=("patterns",), progress=False)
    assert forwards == []


def test_ragged_ioi_traced_as_a_batch_equals_each_prompt_alone(smollm2):
    b = ioi(smollm2.tokenizer, 6, seed=0)
    assert len(set(b.real_lengths.tolist())) > 1
    tr = trace(smollm2, b, sites=("resid",), layers=(5,), batch_size=4, progress=False)
    for i in range(b.batch_size):
        n = int(b.real_lengths[i])
        row = b.clean[i, :n][None]
        logits, cache = smollm2.run_with_cache(row)
        torch.testing.assert_close(tr.resid(5)[i, :n], cache["blocks.5.hook_resid_post"][0],
                                   atol=1e-3, rtol=1e-3)
        assert int(tr.top_tokens[i, 0]) == int(logits[0, -1].argmax())
        assert int(b.answer_pos[i]) == n - 1
