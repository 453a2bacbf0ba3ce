"""Attention sites (q, k, v, attn_scores) on grouped-query models, gradient traces, the memory
budget and TaskBatch input: each checked against the model's own hooks (literal TransformerLens
names) or an independent computation."""

from __future__ import annotations

import glob
import math
import shutil

import pytest
import torch

from mechscope.errors import InputError
from mechscope.probes import TraceConfig, Tracer, count_hooks, hooked, trace, trace_with_grad
from mechscope.tasks import TaskBatch

GQA = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=3,n_key_value_heads=2"


@pytest.fixture(scope="module")
def gqa():
    from mechscope.models import load

    return load(GQA)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer HF Llama with 4 query and 2 KV heads (the bridge SmolLM2 uses), with the
    MiniLM tokenizer files so that the local-directory loader accepts it; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechscope.models import load
    from mechscope.models.hf import minilm_dir

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      head_dim=8)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    for pattern in ("*tok*", "vocab*", "special*"):
        for f in glob.glob(str(minilm_dir() / pattern)):
            shutil.copy(f, d)
    return load(str(d))


def _tokens(n=2, pos=6, vocab=50, seed=0):
    return torch.randint(1, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _attention_properties(model, tr, cache, layer, *, rotary):
    """scores = q·kᵀ/sqrt(d_head) with kv head h // group; softmax(scores) = pattern; pattern @ v = z."""
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    group = n_heads // n_kv
    q = cache[f"blocks.{layer}.attn.hook_{'rot_q' if rotary else 'q'}"]
    k = cache[f"blocks.{layer}.attn.hook_{'rot_k' if rotary else 'k'}"]
    v = tr.v(layer)
    assert k.shape[2] == v.shape[2] == n_kv and q.shape[2] == n_heads
    kv_of = torch.arange(n_heads) // group  # repeat_interleave grouping
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv_of]) / math.sqrt(model.cfg.d_head)
    pos = q.shape[1]
    causal = torch.tril(torch.ones(pos, pos, dtype=torch.bool))
    masked = scores.masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(masked.softmax(-1), tr.pattern(layer), atol=1e-5, rtol=1e-5)
    z = torch.einsum("bhqk,bkhd->bqhd", tr.pattern(layer), v[:, :, kv_of])
    torch.testing.assert_close(z, tr.heads(layer), atol=1e-5, rtol=1e-5)
    return scores, causal


def test_qkv_on_native_gqa_match_literal_hooks_and_attention(gqa):
    tokens = _tokens()
    tr = trace(gqa, tokens, sites=("q", "k", "v", "heads", "patterns"), progress=False)
    _, cache = gqa.run_with_cache(tokens)
    assert tr.q(0).shape == (2, 6, 4, 8) and tr.k(0).shape == tr.v(1).shape == (2, 6, 2, 8)
    for layer in range(2):
        for site in ("q", "k", "v"):
            torch.testing.assert_close(tr.get(site, layer), cache[f"blocks.{layer}.attn.hook_{site}"])
        _attention_properties(gqa, tr, cache, layer, rotary=False)
    with pytest.raises(InputError, match="post-softmax"):
        Tracer(gqa, sites=("attn_scores",))


def test_attn_scores_on_a_tiny_llama_with_gqa(tiny_llama):
    tokens = _tokens(vocab=64)
    sites = ("attn_scores", "patterns", "q", "k", "v", "heads")
    tr = trace(tiny_llama, tokens, sites=sites, progress=False)
    _, cache = tiny_llama.run_with_cache(tokens)
    for layer in range(2):
        for site in ("attn_scores", "q", "k", "v"):
            torch.testing.assert_close(tr.get(site, layer), cache[f"blocks.{layer}.attn.hook_{site}"])
        assert tr.k(layer).shape == (2, 6, 2, 8) and tr.attn_scores(layer).shape == (2, 4, 6, 6)
        s = tr.attn_scores(layer)
        torch.testing.assert_close(s.softmax(-1), tr.pattern(layer), atol=1e-6, rtol=1e-5)
        scores, causal = _attention_properties(tiny_llama, tr, cache, layer, rotary=True)
        torch.testing.assert_close(s[:, :, causal], scores[:, :, causal], atol=1e-5, rtol=1e-5)
        assert float(s[:, :, ~causal].max()) < -1e30  # masked entries hold the mask value


def test_kv_heads_restriction(gqa):
    tokens = _tokens()
    full = trace(gqa, tokens, sites=("k", "q"), progress=False)
    part = trace(gqa, tokens, sites=("k", "q"), heads=(3,), kv_heads=(1,), progress=False)
    torch.testing.assert_close(part.k(1), full.k(1)[:, :, [1]])
    torch.testing.assert_close(part.q(1), full.q(1)[:, :, [3]])
    with pytest.raises(InputError, match="kv_heads="):
        Tracer(gqa, sites=("k",), heads=(3,))
    with pytest.raises(InputError, match="out of range"):
        Tracer(gqa, sites=("k",), kv_heads=(2,))


# --- gradients -------------------------------------------------------------------------------

GRAD_SITES = {"resid_pre": "blocks.{l}.hook_resid_pre", "heads": "blocks.{l}.attn.hook_z",
              "patterns": "blocks.{l}.attn.hook_pattern", "attn_out": "blocks.{l}.hook_attn_out",
              "ffn": "blocks.{l}.mlp.hook_post", "k": "blocks.{l}.attn.hook_k"}


def _metric(logits):
    return logits[:, -1, 3].sum() - logits[:, -2, 7].sum()


def _reference_grad(model, tokens, name):
    """d metric / d activation at one hook point, by a hand-made leaf and .backward()."""
    leaf = {}

    def make_leaf(act, hook):
        leaf["x"] = act.detach().clone().requires_grad_(True)
        return leaf["x"]

    with hooked(model, [(name, make_leaf)]):
        _metric(model(tokens)).backward()
    return leaf["x"].grad


@pytest.mark.parametrize("model_name", ["tiny", "gqa"])
def test_grads_match_autograd(model_name, request):
    model = request.getfixturevalue(model_name)
    tokens = _tokens(n=3, pos=7)
    tr = trace_with_grad(model, tokens, _metric, sites=(*GRAD_SITES, "head_resid"), progress=False)
    assert all(p.grad is None for p in model.parameters())  # parameters are never touched
    for site, name in GRAD_SITES.items():
        for layer in range(2):
            ref = _reference_grad(model, tokens, name.format(l=layer))
            got = tr.grads[f"{site}.{layer}"]
            assert got.shape == tr.get(site, layer).shape
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
            assert float(ref.abs().sum()) > 0
    n_heads = model.cfg.n_heads
    for layer in range(2):
        expect = tr.grads[f"attn_out.{layer}"].unsqueeze(2).expand(-1, -1, n_heads, -1)
        torch.testing.assert_close(tr.grads[f"head_resid.{layer}"], expect)
    assert count_hooks(model) == 0


def test_grads_respect_restrictions_and_unused_keys_are_zero(tiny):
    tokens = _tokens(n=2, pos=7)
    full = trace_with_grad(tiny, tokens, _metric, sites=("heads", "resid"), progress=False)
    part = trace_with_grad(tiny, tokens, _metric, sites=("heads", "resid"), layers=(0,), heads=(2,),
                           positions=(1, -1), progress=False)
    torch.testing.assert_close(part.grads["heads.0"], full.grads["heads.0"][:, [1, 6]][:, :, [2]])
    torch.testing.assert_close(part.grads["resid.0"], full.grads["resid.0"][:, [1, 6]])

    def constant(act, hook):  # cuts layer 0 off from the output
        return torch.zeros_like(act)

    with hooked(tiny, [("blocks.0.hook_resid_post", constant)]):
        cut = trace_with_grad(tiny, tokens, _metric, sites=("resid_pre", "resid"), progress=False)
    for key in ("resid_pre.0", "resid.0"):
        assert cut.grads[key] is not None and float(cut.grads[key].abs().sum()) == 0.0
    assert float(cut.grads["resid.1"].abs().sum()) > 0
    with pytest.raises(InputError, match="scalar"):
        trace_with_grad(tiny, tokens, lambda logits: logits[:, -1, 0], progress=False)


# --- memory budget ---------------------------------------------------------------------------

RAGGED = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15, 16], [3, 3]]


@pytest.mark.parametrize("fields", [
    {"sites": ("heads", "patterns", "head_resid", "q", "k", "ffn", "resid")},
    {"sites": ("patterns", "k", "head_resid"), "heads": (1, 2), "kv_heads": (0,), "positions": (-1,),
     "layers": (1,), "dtype": "float16"},
])
def test_estimate_equals_captured_bytes(gqa, fields):
    config = TraceConfig(batch_size=2, **fields)
    with Tracer(gqa, config) as tracer:
        est = tracer.estimate(RAGGED)
        tr = tracer.run(RAGGED, progress=False)
    assert est.capture == sum(t.nbytes for t in tr.tensors.values()) > 0
    g = trace_with_grad(gqa, RAGGED, _metric, config, progress=False)
    with Tracer(gqa, config, grad=True) as tracer:
        est = tracer.estimate(RAGGED)
    assert est.capture == sum(t.nbytes for t in [*g.tensors.values(), *g.grads.values()])


def test_over_budget_is_refused_before_any_forward(tiny, monkeypatch):
    forwards = []
    with hooked(tiny, [("hook_embed", lambda act, hook: forwards.append(1))], role="read"):
        with pytest.raises(InputError, match=r"estimated at .* over the memory budget .*out_dir="):
            trace(tiny, RAGGED, sites=("patterns",), max_bytes=1000, progress=False)
        monkeypatch.setenv("MECHSCOPE_MAX_BYTES", "1K")
        with pytest.raises(InputError, match="1.0 KiB"):
            trace(tiny, RAGGED, sites=("resid",), progress=False)
        assert forwards == []
        trace(tiny, RAGGED, sites=("resid",), max_bytes=2**20, progress=False)
    assert forwards == [1]


# --- TaskBatch input -------------------------------------------------------------------------


def test_ragged_task_batch_is_traced_at_real_lengths(tiny):
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    crows = [[1, 2, 3, 4, 9], [6, 8], [8, 9, 11]]
    n = torch.tensor([len(r) for r in rows])
    pad = lambda rs: torch.tensor([r + [0] * (5 - len(r)) for r in rs])  # noqa: E731
    batch = TaskBatch(task="toy", clean=pad(rows), corrupt=pad(crows), answer=torch.tensor([1, 2, 3]),
                      corrupt_answer=torch.tensor([4, 5, 6]), answer_pos=n - 1, seed=0, lengths=n)
    for corrupt, source in ((False, rows), (True, crows)):
        tr = trace(tiny, batch, sites=("resid",), batch_size=2, corrupt=corrupt, progress=False)
        assert tr.lengths.tolist() == n.tolist()
        for i, row in enumerate(source):
            logits, cache = tiny.run_with_cache(torch.tensor([row]))
            torch.testing.assert_close(tr.resid(1)[i, : len(row)],
                                       cache["blocks.1.hook_resid_post"][0], atol=1e-5, rtol=1e-5)
            assert int(tr.top_tokens[i, 0]) == int(logits[0, -1].argmax())
    with pytest.raises(InputError, match="inside each row's real length"):
        TaskBatch(task="toy", clean=pad(rows), corrupt=pad(crows), answer=torch.tensor([1, 2, 3]),
                  corrupt_answer=torch.tensor([4, 5, 6]), answer_pos=torch.tensor([4, 4, 4]), seed=0,
                  lengths=n)
