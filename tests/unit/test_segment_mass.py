"""Segment attention (:mod:`mechscope.circuits.segment_mass`) by its definition: the attention mass
on the segment's keys read from the captured pattern, the same on the statistics path, a closed
form on a planted uniform-attention model, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.circuits import SegmentAttention, segment_attention
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.probes import Tracer
from mechscope.store import Store

GQA = ("native:n_layers=2,d_model=16,n_heads=4,d_head=8,d_mlp=32,d_vocab=11,n_ctx=64,"
       "n_key_value_heads=2,positional_embedding_type=rotary")  # fmt: skip
NATIVE = "native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=16"


@pytest.fixture(scope="module")
def induction_model():
    return load("zoo:induction")


@pytest.fixture(scope="module")
def gqa():
    return load(GQA)


def _prompts(d_vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, d_vocab, (n,), generator=g).tolist() for n in lengths]


def _direct(model, ids: list[int], span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mass``/``last_mass`` ``[layer, head]`` of one prompt from its traced pattern."""
    s, e = span
    with Tracer(model, sites=("patterns",)) as tracer:
        _, tr = tracer.forward(torch.tensor([ids]))
    pats = torch.stack([tr.pattern(layer)[0].float() for layer in range(model.cfg.n_layers)])
    on_seg = pats[..., s:e].sum(-1)  # [layer, head, query]
    return on_seg[..., e:].mean(-1), on_seg[..., -1]


def test_mass_is_the_patterns_attention_on_the_segment(induction_model):
    m = induction_model
    prompts = _prompts(int(m.cfg.d_vocab), [24, 17, 30, 12])
    spans = [(3, 9), (0, 5), (3, 9), (6, 11)]  # two prompts share a span: one batch of two
    res = segment_attention(m, prompts, spans, path="patterns", progress=False)
    assert res.attention_path["path"] == "patterns"
    assert res.spans == spans and res.lengths == [24, 17, 30, 12]
    for i, (ids, span) in enumerate(zip(prompts, spans, strict=True)):
        mass, last = _direct(m, ids, span)
        torch.testing.assert_close(res.prompt_mass[i], mass, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res.prompt_last_mass[i], last, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.mass, res.prompt_mass.mean(0))
    torch.testing.assert_close(res.last_mass, res.prompt_last_mass.mean(0))


def test_one_span_for_all_prompts_and_a_span_given_as_a_list(induction_model):
    m = induction_model
    prompts = _prompts(int(m.cfg.d_vocab), [20, 14], seed=1)
    a = segment_attention(m, prompts, (2, 7), progress=False)
    b = segment_attention(m, prompts, [2, 7], progress=False)  # two ints: one span, not two
    assert a.spans == b.spans == [(2, 7), (2, 7)]
    torch.testing.assert_close(a.prompt_mass, b.prompt_mass)


@pytest.mark.parametrize("which", ["gqa", "zoo"])
def test_the_statistics_path_equals_the_pattern_path(which, gqa, induction_model):
    m = gqa if which == "gqa" else induction_model
    prompts = _prompts(int(m.cfg.d_vocab), [40, 23, 33], seed=2)
    spans = [(5, 17), (1, 4), (20, 30)]
    pat = segment_attention(m, prompts, spans, path="patterns", progress=False)
    st = segment_attention(m, prompts, spans, path="stats", progress=False)
    assert (pat.attention_path["path"], st.attention_path["path"]) == ("patterns", "stats")
    torch.testing.assert_close(st.prompt_mass, pat.prompt_mass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st.prompt_last_mass, pat.prompt_last_mass, atol=1e-5, rtol=1e-4)


def test_auto_takes_the_statistics_path_over_the_budget(gqa, monkeypatch):
    prompts = _prompts(11, [30, 21], seed=3)
    small = segment_attention(gqa, prompts, (4, 12), progress=False)
    assert small.attention_path["path"] == "patterns"
    monkeypatch.setenv("MECHSCOPE_MAX_BYTES", "1000")
    res = segment_attention(gqa, prompts, (4, 12), progress=False)
    assert res.attention_path["path"] == "stats"
    assert "budget" in res.attention_path["why"]
    torch.testing.assert_close(res.prompt_mass, small.prompt_mass, atol=1e-5, rtol=1e-4)
    assert res.provenance.config["path"] == "auto"


@pytest.mark.parametrize("path", ["patterns", "stats"])
def test_planted_uniform_attention_gives_the_closed_form(path):
    # queries zeroed: every score is 0, so query i spreads 1 / (i + 1) over keys 0..i
    m = load(GQA)
    with torch.no_grad():
        for block in m.blocks:
            q = block._original_component.attn.q
            q.weight.zero_()
            q.bias.zero_()
    n, (s, e) = 25, (4, 10)
    res = segment_attention(m, _prompts(11, [n], seed=4), (s, e), path=path, progress=False)
    want = torch.tensor([(e - s) / (i + 1) for i in range(e, n)]).mean()
    torch.testing.assert_close(res.mass, torch.full((2, 4), float(want)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.last_mass, torch.full((2, 4), (e - s) / n), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["patterns", "stats"])
def test_the_whole_prefix_gets_all_but_the_last_querys_self_attention(gqa, path):
    # causal rows sum to 1, so the last query's mass on keys [0, n-1) is 1 - A[n-1, n-1]
    ids = _prompts(11, [19], seed=5)[0]
    res = segment_attention(gqa, [ids], (0, 18), path=path, progress=False)
    with Tracer(gqa, sites=("patterns",)) as tracer:
        _, tr = tracer.forward(torch.tensor([ids]))
    self_attn = torch.stack([tr.pattern(layer)[0, :, -1, -1].float() for layer in range(2)])
    torch.testing.assert_close(res.last_mass, 1 - self_attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.mass, res.last_mass)  # one query after the segment: the last


def test_result_views_payload_and_store_round_trip(induction_model, tmp_path):
    m = induction_model
    res = segment_attention(m, _prompts(int(m.cfg.d_vocab), [20, 16], seed=6), (2, 8),
                            progress=False)  # fmt: skip
    assert isinstance(res, SegmentAttention) and res.mass.shape == (2, 4)
    top = res.top(3)
    assert len(top) == 3 and res.mass[top[0]] == res.mass.max()
    assert res.top(by="last")[0] == tuple(int(x) for x in divmod(int(res.last_mass.argmax()), 4))
    assert len(res.top()) == 8
    frame = res.to_frame()
    assert list(frame.columns) == ["layer", "head", "mass", "last_mass", "mass_std"]
    assert len(frame) == 8
    res.figure()
    res.figure("last")
    body = res.payload()
    json.dumps(body, allow_nan=False)
    assert body["attention_path"]["path"] == "patterns" and body["spans"] == [[2, 8], [2, 8]]
    store = Store(tmp_path)
    assert SegmentAttention.load(store, res.save(store)) == res
    with pytest.raises(InputError, match="positive"):
        res.top(0)


# -- bad input -----------------------------------------------------------------------------------


def test_a_segment_past_the_end_names_the_span_and_the_length():
    m = load(NATIVE)
    with pytest.raises(InputError, match=r"\(2, 9\).*6 tokens"):
        segment_attention(m, torch.tensor([[1, 2, 3, 4, 5, 6]]), (2, 9), progress=False)


def test_a_segment_without_later_queries_is_refused():
    m = load(NATIVE)
    with pytest.raises(InputError, match="no query comes after it"):
        segment_attention(m, torch.tensor([[1, 2, 3, 4, 5, 6]]), (2, 6), progress=False)


@pytest.mark.parametrize(("kw", "match"), [
    ({"segment": (1, 3), "path": "flash"}, "unknown attention path 'flash'"),
    ({"segment": [(1, 3), (0, 2), (1, 2)]}, "3 segments for 2 prompts"),
    ({"segment": "some text"}, "no tokenizer"),
    ({"segment": (3, 3)}, "not a non-empty span"),
])  # fmt: skip
def test_bad_inputs_are_input_errors(kw, match):
    m = load(NATIVE)
    with pytest.raises(InputError, match=match):
        segment_attention(m, torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]]),
                          progress=False, **kw)  # fmt: skip
