"""Attention sinks and ACT calibration (METHODS.md section 4), by their defining properties."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.circuits.attention import causal_mask
from mechscope.circuits.sinks import (
    AttentionSinks,
    CalibrationResult,
    act_key_scores,
    calibrate,
    calibration,
    default_run,
    find_sinks,
    infer_lengths,
    massive_dims,
    select_calibration_heads,
    sink_mask,
)
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.probes import intervene
from mechscope.store import Store
from mechscope.tasks import induction

NATIVE = "native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=16"


def random_pattern(b: int, h: int, n: int, *, causal: bool = True, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, n, n, generator=gen)
    if causal:
        logits = logits.masked_fill(~causal_mask(logits), float("-inf"))
    return logits.softmax(-1)


def planted(n: int = 32, cols: tuple[int, ...] = (0, 5), causal: bool = True) -> torch.Tensor:
    """Uniform attention over visible keys, then half of each row's mass moved onto ``cols``."""
    vis = causal_mask(torch.zeros(1, 1, n, n)) if causal else torch.ones(n, n, dtype=torch.bool)
    a = vis.float() / vis.sum(-1, keepdim=True)
    for i in range(n):
        seen = [c for c in cols if vis[i, c]]
        if seen:
            a[i] *= 0.5
            for c in seen:
                a[i, c] += 0.5 / len(seen)
    return a[None, None].expand(2, 3, n, n).clone()


def reference_act(a: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """ACT on one causal head, written out row by row (no batching, no broadcasting)."""
    n = a.shape[0]
    score = [float(a[:, j].sum()) / (n - j) for j in range(n)]
    sinks = [j for j in range(n) if score[j] > threshold][1:]  # the first sink is kept
    out = a.clone()
    for i in range(n):
        freed = sum(float(a[i, j]) for j in sinks) * (1 - beta)
        others = {j: float(a[i, j]) for j in range(n) if j not in sinks}
        total = sum(others.values())
        if total == 0:
            continue
        for j in range(n):
            out[i, j] = a[i, j] * beta if j in sinks else a[i, j] + freed * others[j] / total
    return out


# -- detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_planted_sink_columns_are_found_and_nothing_else(causal):
    a = planted(causal=causal)
    mask = sink_mask(act_key_scores(a))
    assert mask.shape == (2, 3, 32)
    assert mask.nonzero()[:, 2].unique().tolist() == [0, 5]
    assert bool(mask[..., [0, 5]].all())


def test_act_key_score_is_mean_over_queries_that_see_the_key():
    a = random_pattern(1, 2, 9, seed=3)
    scores = act_key_scores(a)
    expect = a.sum(-2) / torch.arange(9, 0, -1)
    torch.testing.assert_close(scores, expect)
    enc = random_pattern(1, 2, 9, causal=False)
    torch.testing.assert_close(act_key_scores(enc), enc.mean(-2))


def test_padding_is_ignored_and_lengths_are_read_from_the_pattern():
    a = random_pattern(1, 2, 6, seed=1)
    padded = torch.zeros(1, 2, 9, 9)
    padded[..., :6, :6] = a
    padded[..., 6:, :6] = a[..., -1:, :]  # padded queries: anything on real keys
    assert infer_lengths(padded).tolist() == [6]
    scores = act_key_scores(padded, torch.tensor([6]))
    torch.testing.assert_close(scores[..., :6], act_key_scores(a))
    assert not bool(scores[..., 6:].any())


def test_min_queries_drops_keys_seen_by_few_queries():
    a = planted(n=16)
    scores = act_key_scores(a, min_queries=4)
    assert not bool(scores[..., 13:].any()) and bool(scores[..., :13].all())


def test_planted_massive_dims_are_found_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 10, 1024, generator=gen)
    h[0, 0, 7] = 400.0
    h[1, 4, 300] = -400.0
    found = massive_dims(h)
    assert found.dims.tolist() == [7, 300]
    assert found.tokens.nonzero().tolist() == [[0, 0], [1, 4]]
    assert float(found.peak[0, 0]) > 20 and float(found.peak[0, 1]) < 20
    assert massive_dims(h, lengths=torch.tensor([10, 4])).dims.tolist() == [7]


# -- calibration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("beta", [0.1, 0.4, 0.9])
def test_calibrated_rows_sum_to_one(causal, beta):
    a = random_pattern(3, 4, 12, causal=causal, seed=2)
    mask = torch.rand(3, 4, 12, generator=torch.Generator().manual_seed(1)) < 0.3
    out = calibrate(a, mask, beta)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 4, 12))
    assert bool((out >= 0).all())


def test_beta_one_is_the_identity():
    a = random_pattern(2, 3, 10)
    out = calibrate(a, torch.ones(10, dtype=torch.bool), 1.0)
    assert torch.equal(out, a)


def test_non_sink_proportions_are_preserved_and_sinks_scaled_by_beta():
    a = random_pattern(2, 3, 10, seed=5)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 3, 6]] = True
    out = calibrate(a, mask, 0.4, keep_first=True)  # 0 kept: 3 and 6 are calibrated
    torch.testing.assert_close(out[..., [3, 6]], a[..., [3, 6]] * 0.4)
    keep = [0, 1, 2, 4, 5, 7, 8, 9]
    rows = a[..., 7:, keep].sum(-1) > 0  # rows that see every key
    ratio_in = a[..., 7:, keep] / a[..., 7:, keep][..., :1]
    ratio_out = out[..., 7:, keep] / out[..., 7:, keep][..., :1]
    torch.testing.assert_close(ratio_out, ratio_in)
    assert bool(rows.all())
    # keep_first=False calibrates column 0 as well (query 0 sees only key 0: left as it is)
    out = calibrate(a, mask, 0.4, keep_first=False)
    torch.testing.assert_close(out[..., 1:, 0], a[..., 1:, 0] * 0.4)
    assert torch.equal(out[..., 0, :], a[..., 0, :])


def test_calibration_matches_act_written_row_by_row():
    a = planted(n=12, cols=(0, 4, 7))[0, 0]
    a = 0.7 * a + 0.3 * random_pattern(1, 1, 12, seed=4)[0, 0]
    mask = sink_mask(act_key_scores(a[None, None]), 0.1)
    assert mask[0, 0, [0, 4, 7]].all()
    out = calibrate(a[None, None], mask, 0.4)[0, 0]
    torch.testing.assert_close(out, reference_act(a, 0.4, 0.1))


def test_calibration_intervention_changes_logits_only_when_beta_below_one():
    model = load(NATIVE)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])
    clean = model(tokens)
    for sinks in ([0, 1, 2], None):
        with intervene(model, calibration([(0, 1), (1, 0)], sinks, beta=1.0)):
            same = model(tokens)
        with intervene(model, calibration([(0, 1), (1, 0)], sinks, beta=0.4)):
            changed = model(tokens)
        assert torch.equal(same, clean)
        assert not torch.allclose(changed, clean)


# -- find_sinks, selection, results --------------------------------------------------------------


def test_find_sinks_result_on_a_native_model(tmp_path):
    model = load(NATIVE)
    gen = torch.Generator().manual_seed(0)
    res = find_sinks(model, torch.randint(0, 11, (5, 12), generator=gen), progress=False)
    assert res.scores.shape == (2, 2) and res.key_scores.shape == (2, 2, 12)
    assert res.causal and all(0 <= float(v) <= 1 for v in res.scores.flatten())
    body = res.payload()
    json.dumps(body, allow_nan=False)
    assert {"scores", "heads", "sinks"} <= set(body)
    assert [list(h) for h in res.heads] == [
        [a, b] for a in range(2) for b in range(2) if float(res.scores[a, b]) > 0.5
    ]
    res.figure()
    res.figure(view="tokens")
    assert len(res.to_frame()) == 4
    store = Store(tmp_path)
    assert AttentionSinks.load(store, res.save(store)) == res


def test_select_calibration_heads_on_zoo_dev_and_held_out(tmp_path):
    from mechscope.tasks import retrieval

    model = load("zoo:retrieval")
    from mechscope.models.zoo.data import retrieval_vocab
    from mechscope.models.zoo.recipes import RECIPES

    vocab = retrieval_vocab(RECIPES["retrieval"])
    dev = retrieval(16, context_len=96, depth=0.3, seed=1, vocab=vocab)
    held = retrieval(16, context_len=96, depth=0.6, seed=2, vocab=vocab)
    res = select_calibration_heads(model, dev, held_out=held, metric="logit_diff", progress=False)
    assert isinstance(res, CalibrationResult)
    assert res.scores.shape == (2, 8) and not bool(res.scores.isnan().any())
    assert all(float(res.scores[h]) > 0 for h in res.heads)
    assert set(res.held_out) == {"baseline", "calibrated"}
    assert res.accuracy_change is not None
    json.dumps(res.payload(), allow_nan=False)
    store = Store(tmp_path)
    assert CalibrationResult.load(store, res.save(store)) == res


def test_default_run_on_a_zoo_model_uses_its_own_task():
    res = default_run(load("zoo:retrieval"), n=11, progress=False)
    assert res.scores.shape == (2, 8) and len(res.lengths) == 11


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5])
def test_beta_outside_unit_interval_is_an_input_error(beta):
    with pytest.raises(InputError, match="beta"):
        calibrate(random_pattern(1, 1, 4), torch.ones(4, dtype=torch.bool), beta)
    with pytest.raises(InputError, match="beta"):
        calibration([(0, 0)], beta=beta)


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan")])
def test_non_positive_threshold_is_an_input_error(threshold):
    with pytest.raises(InputError, match="threshold"):
        sink_mask(torch.ones(3), threshold)
    with pytest.raises(InputError, match="threshold"):
        massive_dims(torch.ones(1, 2, 8), threshold)
    with pytest.raises(InputError, match="threshold"):
        find_sinks(load(NATIVE), torch.tensor([[1, 2, 3]]), threshold=threshold)


def test_model_without_pattern_hook_is_an_input_error(monkeypatch):
    model = load(NATIVE)
    batch = induction(2, seq_len=4, d_vocab=11, seed=0)
    with monkeypatch.context() as m:  # a bridge without hook_pattern points
        m.setattr(type(model), "hook_dict", property(lambda self: {}))
        with pytest.raises(InputError, match="hook_pattern"):
            find_sinks(model, torch.tensor([[1, 2, 3]]))
        with pytest.raises(InputError, match="hook_pattern"):
            default_run(model)
        with pytest.raises(InputError, match="hook_pattern"):
            select_calibration_heads(model, batch, progress=False)


def test_bad_shapes_are_input_errors():
    with pytest.raises(InputError, match="broadcast"):
        calibrate(random_pattern(1, 2, 4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(InputError, match="query <= key"):
        act_key_scores(torch.ones(1, 1, 5, 4))
