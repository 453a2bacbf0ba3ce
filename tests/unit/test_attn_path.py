"""The statistics path (mechscope.circuits.attn_path): its forward equals the bridge's eager one,
its statistics equal those read from materialised patterns, the analyses take it when the
patterns exceed the budget and say so, and it never holds a [query, key] tensor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mechscope.attribution.engine import agrees
from mechscope.circuits.attn_path import StatsForward, choose_path, layer_stats, pattern_bytes
from mechscope.circuits.retrieval import retrieval_scores
from mechscope.circuits.sinks import find_sinks
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.tasks import retrieval
from mechscope.tasks.base import TaskBatch
from mechscope.tasks.retrieval import RetrievalVocab

GQA = ("native:n_layers=2,d_model=16,n_heads=4,d_head=8,d_mlp=32,d_vocab=50,n_ctx=64,"
       "n_key_value_heads=2,positional_embedding_type=rotary")  # fmt: skip
MODELS = [GQA, "zoo:induction", "zoo:ioi"]


def _prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, int(model.cfg.d_vocab), (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("spec", MODELS)
def test_the_stats_forward_is_the_bridge_forward(spec):
    model = load(spec)
    ids = torch.tensor(_prompts(model, [min(40, int(model.cfg.n_ctx))])[0])
    with torch.no_grad():
        eager = model(ids[None])[0]
    ok, diff = agrees(StatsForward(model).logits(ids), eager)
    assert ok, diff


@pytest.mark.parametrize("spec", [GQA, "zoo:induction"])
def test_both_paths_give_the_same_statistics(spec):
    model = load(spec)
    prompts = _prompts(model, [30, 17, 30, 9])
    from mechscope.probes.tokens import tokenize

    tokens, lengths = tokenize(model, prompts)
    kw = {"queries": [-1, 3], "top_k": 3, "segments": [(0, 1), (2, 6)]}
    by = {}
    for path in ("patterns", "stats"):
        choice = choose_path(model, lengths, path)
        for ls in layer_stats(model, tokens, lengths, choice, resid=True, batch_size=2, **kw):
            for i, r in enumerate(ls.rows.tolist()):
                by.setdefault((path, r, ls.layer), (ls.stats, i, ls.resid_pre))
    for (path, r, layer), (st, i, resid) in by.items():
        if path != "patterns":
            continue
        ot, j, oresid = by[("stats", r, layer)]
        n = int(lengths[r])
        assert torch.allclose(st.received[i, :, :n], ot.received[j, :, :n], atol=1e-5)
        assert torch.allclose(st.entropy[i, :, :n], ot.entropy[j, :, :n], atol=1e-4)
        assert torch.allclose(st.segment_mass[i, :, :n], ot.segment_mass[j, :, :n], atol=1e-5)
        assert torch.allclose(st.max_weight[i], ot.max_weight[j], atol=1e-5)
        assert torch.allclose(st.top_weight[i], ot.top_weight[j], atol=1e-5)
        assert torch.allclose(resid[i, :n], oresid[j, :n], atol=1e-5)


@pytest.mark.parametrize("spec", [GQA, "zoo:induction"])
def test_sinks_by_the_stats_path_equal_sinks_from_patterns(spec):
    model = load(spec)
    prompts = _prompts(model, [30, 17, 30, 9], seed=1)
    a = find_sinks(model, prompts, path="patterns", min_queries=1, progress=False)
    b = find_sinks(model, prompts, path="stats", min_queries=1, progress=False)
    for name in ("scores", "first_share", "key_scores", "sink_freq"):
        x, y = getattr(a, name).nan_to_num(), getattr(b, name).nan_to_num()
        assert torch.allclose(x, y, atol=1e-6), name
    assert a.sinks == b.sinks and a.heads == b.heads and a.hidden == b.hidden
    assert [m["dims"] for m in a.massive] == [m["dims"] for m in b.massive]
    assert a.attention_path["path"] == "patterns" and b.attention_path["path"] == "stats"


def test_auto_takes_the_stats_path_over_the_budget_and_says_why(monkeypatch):
    model = load(GQA)
    prompts = _prompts(model, [40, 20])
    small = find_sinks(model, prompts, progress=False)
    assert small.attention_path["path"] == "patterns"
    assert "fit the memory budget" in small.attention_path["why"]
    monkeypatch.setenv("MECHSCOPE_MAX_BYTES", "10K")
    big = find_sinks(model, prompts, progress=False)
    assert big.attention_path["path"] == "stats"
    assert "exceed the memory budget of 10.0 KiB" in big.attention_path["why"]
    assert big.payload()["attention_path"] == big.attention_path
    assert torch.allclose(small.scores, big.scores, atol=1e-6)


def test_choose_path_sizes_and_refusals(monkeypatch):
    model = load(GQA)
    assert pattern_bytes(model, 10) == 4 * 10 * 10 * 4 * (2 + 2)
    assert choose_path(model, [10]).path == "patterns"
    assert choose_path(model, [10], max_bytes=100).path == "stats"
    assert choose_path(model, [10], "stats").path == "stats"
    assert choose_path(model, [60], "patterns", max_bytes=1).path == "patterns"
    with pytest.raises(InputError, match="unknown attention path 'fast'"):
        choose_path(model, [10], "fast")


def test_a_model_the_stats_path_does_not_know_is_refused_by_name(monkeypatch):
    model = load(GQA)
    from mechscope.attribution import engine

    monkeypatch.setattr(engine.Engine, "why_not", classmethod(lambda cls, m: "ALiBi positions"))
    with pytest.raises(InputError, match="does not know this model's attention: ALiBi positions"):
        choose_path(model, [10], "stats")
    with pytest.raises(InputError, match=r"exceed the memory budget .* ALiBi positions.*Shorten"):
        choose_path(model, [40], max_bytes=100)
    assert choose_path(model, [40]).path == "patterns"  # under the budget: patterns still work


def test_a_soft_capped_model_keeps_the_pattern_path_and_stats_are_refused_with_why():
    model = load("native:n_layers=2,d_model=16,n_heads=4,d_head=8,d_mlp=32,d_vocab=50,n_ctx=64,"
                 "attn_scores_soft_cap=30.0")  # fmt: skip
    with pytest.raises(InputError, match="attention-score soft cap; use path='patterns'"):
        find_sinks(model, _prompts(model, [20]), path="stats", progress=False)
    res = find_sinks(model, _prompts(model, [20]), progress=False)
    assert res.attention_path["path"] == "patterns"


def test_the_stats_forward_refuses_empty_and_too_long_prompts():
    model = load(GQA)
    fwd = StatsForward(model)
    with pytest.raises(InputError, match="empty"):
        fwd.run(torch.tensor([], dtype=torch.long))
    with pytest.raises(InputError, match="more than the model's context of 64"):
        fwd.run(torch.ones(65, dtype=torch.long))


def test_segment_outside_the_sequence_is_a_clear_error():
    model = load(GQA)
    from mechscope.probes.tokens import tokenize

    tokens, lengths = tokenize(model, _prompts(model, [12]))
    choice = choose_path(model, lengths, "stats")
    with pytest.raises(InputError, match="outside"):
        list(layer_stats(model, tokens, lengths, choice, segments=[(5, 40)]))


def test_retrieval_prefill_by_the_stats_path_equals_the_eager_prefill():
    zoo = load("zoo:retrieval")
    vocab = RetrievalVocab()
    batches = [retrieval(4, context_len=64, depth=d, seed=2, vocab=vocab, n_distractors=4)
               for d in (0.1, 0.9)]  # fmt: skip
    a = retrieval_scores(zoo, batches, path="patterns", progress=False)
    b = retrieval_scores(zoo, batches, path="stats", progress=False)
    assert a.work["attention_path"]["path"] == "patterns"
    assert b.work["attention_path"]["path"] == "stats" and b.work["gate"]["argmax_mismatch"] == 0
    assert a.generations == b.generations
    assert torch.equal(a.per_trial, b.per_trial) and torch.equal(a.scores, b.scores)
    with pytest.raises(InputError, match="engine='hooks' runs the bridge's eager attention"):
        retrieval_scores(zoo, batches, path="stats", engine="hooks", progress=False)


def test_retrieval_chooses_the_path_for_its_longest_prompt(monkeypatch):
    zoo = load("zoo:retrieval")
    vocab = RetrievalVocab()
    short, long = (retrieval(2, context_len=n, depth=0.5, seed=4, vocab=vocab, n_distractors=4)
                   for n in (24, 64))  # fmt: skip
    between = (pattern_bytes(zoo, short.seq_len) + pattern_bytes(zoo, long.seq_len)) // 2
    monkeypatch.setenv("MECHSCOPE_MAX_BYTES", str(between))
    r = retrieval_scores(zoo, [short, long], progress=False)
    assert r.work["attention_path"]["path"] == "stats"
    assert str(long.seq_len) in r.work["attention_path"]["why"]


def test_stats_prefill_cache_and_last_row_equal_the_engine_prefill():
    model = load(GQA)
    from mechscope.attribution.engine import Engine

    eng = Engine.of(model)
    assert eng is not None
    tokens = torch.tensor(_prompts(model, [20, 20], seed=3))
    cache, x, pat = eng.prefill(eng.embed(tokens, torch.arange(20).expand(2, -1)))
    scache, sx, spat = StatsForward(model).prefill(tokens)
    assert torch.allclose(cache.k, scache.k, atol=1e-6) and torch.allclose(cache.v, scache.v, atol=1e-6)
    assert torch.allclose(x[:, -1:], sx, atol=1e-5) and torch.allclose(pat, spat, atol=1e-6)
    batch = TaskBatch(task="toy", clean=tokens, corrupt=tokens, answer=tokens[:, 5],
                      corrupt_answer=tokens[:, 5], answer_pos=torch.full((2,), 19), seed=0)  # fmt: skip
    r = retrieval_scores(model, batch, needle_spans=[(3, 6), (8, 10)], max_new_tokens=3,
                         path="stats", progress=False)  # fmt: skip
    assert r.work["path"] == "engine" and r.step_copies.shape == (2, 3)


_MEMORY = r"""
import json, resource, sys, torch
from mechscope.models import load
from mechscope.circuits.sinks import find_sinks
T = int(sys.argv[1])
model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=50,n_ctx=%d" % T)
ids = torch.randint(1, 50, (T,), generator=torch.Generator().manual_seed(0)).tolist()
find_sinks(model, [ids[:64]], path="stats", progress=False)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = find_sinks(model, [ids], path="stats", progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "path": res.attention_path["path"]}))
"""


def test_the_stats_path_never_holds_a_query_by_key_tensor():
    """Peak RSS of sinks over 8,192 synthetic tokens by the statistics path grows by far less
    than one [query, key] fp32 matrix of one head (256 MiB); the pattern path would hold 2 heads
    x 2 layers of them (1 GiB) plus the eager forward's."""
    t = 8192
    out = subprocess.run([sys.executable, "-c", _MEMORY, str(t)], capture_output=True, text=True,
                         timeout=300, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    one_matrix_kib = t * t * 4 // 1024
    print(f"peak RSS growth {got['growth_kib'] / 1024:.1f} MiB; one [T, T] fp32: "
          f"{one_matrix_kib / 1024:.0f} MiB")  # fmt: skip
    assert got["path"] == "stats"
    assert got["growth_kib"] < one_matrix_kib / 4
