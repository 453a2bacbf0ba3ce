"""Head divergence (VHD) and reinforcement (VHR), by their defining properties (METHODS.md §2):
a segment nobody attends to gives VHD = 0, a planted head that reads only the segment ranks first,
alpha = 1 is the identity, and on zoo:retrieval the copy heads diverge most when the needle goes.

Patterns are forced with an outer ``intervene`` on ``patterns`` (applied before the divergence's
own mask), so what each head reads is known exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.circuits.attention import causal_mask, pattern_interventions
from mechscope.circuits.divergence import (
    HeadDivergence,
    Injected,
    default_run,
    evaluate_reinforcement,
    head_divergence,
    reinforce,
    reinforced_layers,
    segment_mask,
    select_reinforced,
)
from mechscope.errors import InputError
from mechscope.probes import Tracer, intervene
from mechscope.results import Provenance, Result
from mechscope.store import Store

SEG = (2, 5)
TOKENS = torch.tensor([[3, 7, 11, 13, 17, 19, 23, 29, 31, 37]])


def _forced(keys: str):
    """A pattern fn: rows after SEG attend uniformly to the segment (``keys="segment"``) or to
    every visible key outside it (``"other"``); rows up to the segment's end stay causal-uniform."""

    def fn(p: torch.Tensor) -> torch.Tensor:
        q, k = p.shape[-2:]
        vis = causal_mask(p).float()
        rows = torch.arange(q)[:, None] + (k - q)
        cols = torch.arange(k)[None, :]
        inside = (cols >= SEG[0]) & (cols < SEG[1])
        after = rows >= SEG[1]
        want = torch.where(after, inside if keys == "segment" else ~inside, torch.ones_like(inside))
        w = vis * want.float()
        return (w / w.sum(-1, keepdim=True)).expand_as(p).contiguous()

    return fn


def _all_heads(model, skip=()):
    return [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)
            if (layer, h) not in skip]  # fmt: skip


def test_a_segment_nobody_attends_to_gives_zero(tiny_attn) -> None:
    forced = pattern_interventions(_all_heads(tiny_attn), _forced("other"))
    with intervene(tiny_attn, forced):
        for metric in ("l2", "cosine", "relative"):
            hd = head_divergence(tiny_attn, TOKENS, SEG, metric=metric, progress=False)
            assert torch.equal(hd.vhd, torch.zeros_like(hd.vhd)), metric
        filler = head_divergence(tiny_attn, TOKENS, SEG, mode="filler", filler_token=1,
                                 progress=False)  # fmt: skip
    assert filler.vhd.abs().max() < 1e-6  # nothing after the segment reads its tokens
    # without the forced patterns the same segment matters
    assert head_divergence(tiny_attn, TOKENS, SEG, progress=False).scores.max() > 1e-3


def test_a_planted_head_that_reads_only_the_segment_ranks_first(tiny_attn) -> None:
    planted = (1, 2)
    forced = [*pattern_interventions(_all_heads(tiny_attn, {planted}), _forced("other")),
              *pattern_interventions([planted], _forced("segment"))]  # fmt: skip
    with intervene(tiny_attn, forced):
        hd = head_divergence(tiny_attn, TOKENS, SEG, progress=False)
    assert hd.top(1) == [planted]
    assert float(hd.scores[planted]) > 0
    assert float(hd.scores.flatten().sort().values[-2]) == 0.0  # every other head exactly 0


def test_segment_mask_keeps_row_mass_and_untouched_rows_bit_for_bit() -> None:
    p = torch.rand(2, 3, 8, 8).tril()
    p = p / p.sum(-1, keepdim=True)
    out = segment_mask(2, 4)(p)
    assert torch.equal(out[..., :4, :], p[..., :4, :])  # rows up to the segment's end
    assert torch.allclose(out.sum(-1), p.sum(-1))
    assert torch.equal(out[..., 4:, 2:4], torch.zeros_like(out[..., 4:, 2:4]))
    q = p.clone()
    q[..., 4:, 2:4] = 0.0  # no mass on the segment: unchanged exactly
    assert torch.equal(segment_mask(2, 4)(q), q)


def test_delete_compares_the_query_at_its_shifted_position(tiny) -> None:
    hd = head_divergence(tiny, TOKENS, SEG, mode="delete", query="generated", n_generate=3,
                         progress=False)  # fmt: skip
    assert hd.vhd.shape == (1, 3, 2, 4) and hd.t_vhd.shape == (1, 3)
    full = TOKENS[0]
    with Tracer(tiny, sites=("heads",)) as tr:
        gen = []
        for _ in range(3):  # greedy continuation, as head_divergence decodes it
            logits, _ = tr.forward(torch.cat([full, torch.tensor(gen, dtype=torch.long)])[None])
            gen.append(int(logits[0, -1].argmax()))
        ext = torch.cat([full, torch.tensor(gen[:-1])])
        _, a = tr.forward(ext[None])
        _, b = tr.forward(torch.cat([ext[: SEG[0]], ext[SEG[1] :]])[None])
    n, cut = full.numel(), SEG[1] - SEG[0]
    for j in range(3):
        want = (a.heads(1)[0, n - 1 + j] - b.heads(1)[0, n - 1 + j - cut]).norm(dim=-1)
        torch.testing.assert_close(hd.vhd[0, j, 1], want)
    top = hd.vhd.topk(hd.top_k, dim=-1).values.sum((-1, -2))
    torch.testing.assert_close(hd.t_vhd, top)


def test_injecting_the_tokens_own_embeddings_equals_the_token_span(tiny) -> None:
    with Tracer(tiny, sites=("resid_pre",), layers=(0,)) as tr:
        _, t = tr.forward(TOKENS)
    inj = Injected(start=SEG[0], vectors=t.resid_pre(0)[0, SEG[0] : SEG[1]])
    a = head_divergence(tiny, TOKENS, SEG, progress=False)
    b = head_divergence(tiny, TOKENS, inj, progress=False)
    torch.testing.assert_close(a.vhd, b.vhd, rtol=0, atol=1e-6)
    other = Injected(start=SEG[0], vectors=torch.randn(3, tiny.cfg.d_model))
    assert not torch.allclose(head_divergence(tiny, TOKENS, other, progress=False).vhd, a.vhd)


def test_alpha_one_is_the_identity_bit_for_bit(tiny, toy_task) -> None:
    clean = tiny(TOKENS)
    heads = [(0, 1), (1, 0), (1, 3)]
    with intervene(tiny, reinforce(heads, 1.0)):
        same = tiny(TOKENS)
    with intervene(tiny, reinforce(heads, 2.0)):
        doubled = tiny(TOKENS)
    assert torch.equal(same, clean) and not torch.equal(doubled, clean)
    res = evaluate_reinforcement(tiny, toy_task(), heads, alpha=1.0, n_random=2, progress=False)
    assert res.conditions == ["base", "vhr", "random_0", "random_1"]
    assert torch.equal(
        res.answer_prob_rows, res.answer_prob_rows[:1].expand_as(res.answer_prob_rows)
    )
    res2 = evaluate_reinforcement(tiny, toy_task(), heads, alpha=3.0, n_random=1, progress=False)
    assert res2.answer_prob[1] != res2.answer_prob[0]
    for draw in res2.random_heads:  # same layers, same count per layer
        assert sorted(h[0] for h in draw) == sorted(h[0] for h in heads)


def _handmade(vhd_row, energy_row) -> HeadDivergence:
    v = torch.tensor([vhd_row], dtype=torch.float32)[None, None]  # [1, 1, 1, head]
    e = torch.tensor([energy_row], dtype=torch.float32)[None, None]
    return HeadDivergence(provenance=Provenance.of(None), vhd=v, energy=e,
                          t_vhd_layers=v.sum(-1), spans=[(0, 1)], query_pos=[[2]],
                          token_labels=["x"], mode="mask", metric="l2", query="last", top_k=1)  # fmt: skip


def test_vhr_selection_zeroes_outliers_then_takes_above_median() -> None:
    both = _handmade([1, 2, 3, 4, 100], [1, 1, 1, 1, 100])
    assert select_reinforced(both) == [(0, 2), (0, 3)]  # head 4 zeroed; median 2
    vhd_only = _handmade([1, 2, 3, 4, 100], [1, 1, 1, 1, 1])
    assert select_reinforced(vhd_only) == [(0, 3), (0, 4)]  # not an energy outlier: kept
    assert select_reinforced(both, outliers=False) == [(0, 3), (0, 4)]
    assert reinforced_layers(32) == list(range(18, 32)) and reinforced_layers(30)[0] == 17


@pytest.fixture(scope="module")
def retrieval_model():
    from mechscope.models import load

    return load("zoo:retrieval")


def test_zoo_retrieval_copy_heads_diverge_most_in_every_mode(retrieval_model) -> None:
    from mechscope.models.zoo.groundtruth import GroundTruth
    from mechscope.tasks import retrieval

    truth = GroundTruth.load("zoo:retrieval")
    copy_heads = set(truth.retrieval.heads)
    hd = default_run(retrieval_model, n=6, progress=False)
    assert set(hd.top(2)) == copy_heads
    assert truth.score_heads(hd.scores.numpy())["auc_retrieval"] == 1.0
    copy = np.asarray(truth.head_scores["copy"])
    assert {
        tuple(map(int, np.unravel_index(i, copy.shape))) for i in np.argsort(copy, None)[-2:]
    } == copy_heads
    b = retrieval(4, context_len=96, seed=3)
    spans = [(s, s + 2) for s in b.meta["needle_start"]]
    grids = {}
    for mode in ("mask", "delete", "filler"):
        r = head_divergence(retrieval_model, b.clean, spans, mode=mode, progress=False)
        assert set(r.top(2)) == copy_heads, mode
        assert bool(torch.isfinite(r.vhd).all()) and bool((r.vhd >= 0).all())
        grids[mode] = r.scores
    for mode in (
        "delete",
        "filler",
    ):  # the modes agree: same sign of (score - median) on copy heads
        for h in copy_heads:
            assert (
                float(grids[mode][h]) > float(grids[mode].median()) and float(grids["mask"][h]) > 0
            )


def test_result_round_trips_and_payload_is_json(tiny, tmp_path) -> None:
    hd = head_divergence(tiny, TOKENS, SEG, query="generated", n_generate=2, progress=False)
    store = Store(tmp_path)
    assert Result.load(store, hd.save(store)) == hd
    body = json.loads(json.dumps(hd.payload(), allow_nan=False))
    assert len(body["scores"]) == 2 and len(body["scores"][0]) == 4 and body["spans"] == [[2, 5]]
    assert body["heads"] == [list(h) for h in hd.top()]
    assert hd.figure().data and hd.figure(view="tokens").data
    assert list(hd.to_frame().columns) == ["layer", "head", "vhd", "vhd_first", "vhd_std", "energy"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"segment": (3, 3)}, "non-empty span"),
    ({"segment": ""}, "empty"),
    ({"segment": "some text"}, "no tokenizer"),
    ({"segment": (2, 6), "query": 4}, "inside or before"),
    ({"segment": (2, 6), "query": 1}, "inside or before"),
    ({"segment": (2, 6), "query": 40}, "outside"),
    ({"segment": [(1, 2), (2, 3)]}, "one per prompt"),
    ({"segment": Injected(start=2, vectors=torch.zeros(2, 5))}, "d_model"),
])  # fmt: skip
def test_bad_inputs_are_input_errors(tiny, kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        head_divergence(tiny, TOKENS, progress=False, **kwargs)


def test_bad_reinforcement_inputs(tiny) -> None:
    for alpha in (0.0, -1.0):
        with pytest.raises(InputError, match="alpha"):
            reinforce([(0, 0)], alpha)
    with pytest.raises(InputError, match="segment"):
        default_run(tiny, prompts=["a"], progress=False)
    with pytest.raises(InputError, match="no built-in prompts"):
        default_run(tiny, progress=False)
