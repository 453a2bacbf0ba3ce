"""DuoAttention gates (mechscope.circuits.streaming) by their defining properties: gates of 1 are
the full model bit for bit, gates of 0 are pure sink + recent attention (rows stochastic, zero
outside the window), a window covering the whole sequence makes the MSE exactly 0 so the L1 term
alone drives every gate down, gradients reach the gates and never the model, and on
``zoo:retrieval`` the ablation-defined retrieval heads keep the highest gates."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch

from mechscope.circuits.streaming import (
    StreamingHeads,
    _final_hidden,
    binarise,
    default_run,
    gate_interventions,
    streaming_gates,
    streaming_mask,
    streaming_pattern,
)
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.models.zoo import RECIPES
from mechscope.models.zoo.data import EVAL_BATCHES
from mechscope.models.zoo.groundtruth import GroundTruth
from mechscope.probes import intervene, trace
from mechscope.store import Store
from mechscope.tasks.base import TaskBatch

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=1"
FRESH_SEED = 777


def _batch(n: int = 2, seq: int = 16, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, seq), generator=g)
    z = torch.zeros(n, dtype=torch.long)
    return TaskBatch(task="toy", clean=ids, corrupt=ids, answer=z, corrupt_answer=z,
                     answer_pos=torch.full((n,), seq - 1), seed=seed)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


def test_alpha_zero_is_pure_streaming_attention(tiny) -> None:
    batch = _batch(seq=20)
    pat = trace(tiny, batch.clean, sites=("patterns",), progress=False).get("patterns", 1)
    sink, recent = 2, 5
    s = streaming_pattern(pat, sink, recent)
    keep = streaming_mask(pat, sink, recent)
    torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:-1]))  # rows stay stochastic
    assert bool((s[..., ~keep] == 0).all())  # nothing outside sink + recent
    # inside the window: the full pattern renormalised (same ratios)
    q = 15
    ratio = s[..., q, :][..., keep[q]] / pat[..., q, :][..., keep[q]]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    # rows whose window already holds every visible key are untouched, bit for bit
    assert torch.equal(s[..., : sink + recent, :], pat[..., : sink + recent, :])
    # gates of 0 write exactly that pattern through the intervention
    with intervene(tiny, gate_interventions(torch.zeros(2, 4), sink, recent)):
        got = trace(tiny, batch.clean, sites=("patterns",), progress=False).get("patterns", 1)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]))
    assert bool((got[..., ~keep] == 0).all())


def test_alpha_one_is_the_full_model_bit_for_bit(tiny) -> None:
    batch = _batch()
    clean = tiny(batch.clean)
    with intervene(tiny, gate_interventions(torch.ones(2, 4), sink=1, recent=2)):
        mixed = tiny(batch.clean)
    assert torch.equal(mixed, clean)


def test_a_window_covering_the_sequence_gives_zero_mse_and_every_gate_decays(tiny) -> None:
    steps = 6
    res = streaming_gates(tiny, _batch(seq=12), sink=4, recent=8, steps=steps, progress=False)
    assert res.mse_curve.tolist() == [0.0] * steps and res.final_mse == 0.0
    assert bool((res.gates < 1.0).all())  # every gate went down, pushed by the L1 term alone
    # Adam with a constant-sign gradient moves each gate by ~lr per step
    torch.testing.assert_close(res.gates, torch.full_like(res.gates, 1 - 0.02 * steps),
                               atol=1e-3, rtol=0)  # fmt: skip
    assert bool((res.loss_curve.diff() < 0).all())
    # one step further, again lower: the gates decay monotonically
    more = streaming_gates(tiny, _batch(seq=12), sink=4, recent=8, steps=steps + 1, progress=False)
    assert bool((more.gates < res.gates).all())


def test_gradients_reach_the_gates_and_never_the_model(tiny) -> None:
    batch = _batch(seq=16)
    gates = torch.ones(2, 4, requires_grad=True)
    mixed = _final_hidden(tiny, batch.clean, batch.answer_pos, gate_interventions(gates, 1, 2))
    full = _final_hidden(tiny, batch.clean, batch.answer_pos, [])
    ((mixed - full.detach()).pow(2).sum() + (gates - 0.5).sum()).backward()
    assert gates.grad is not None and bool(torch.isfinite(gates.grad).all())
    assert float(gates.grad.abs().sum()) > 0
    for p in tiny.parameters():
        p.grad = None
    before = [p.requires_grad for p in tiny.parameters()]
    res = streaming_gates(tiny, batch, sink=1, recent=2, steps=3, progress=False)
    assert all(p.grad is None for p in tiny.parameters())
    assert [p.requires_grad for p in tiny.parameters()] == before
    assert res.loss_curve.shape == (3,) and float(res.mse_curve[-1]) > 0  # the gates moved


def test_zoo_retrieval_heads_keep_the_highest_gates() -> None:
    """Measured (seed 777 batches, 2 prompts at each of 11 depths, 44 steps): the copy heads
    L1H4, L1H6 end near 1 (0.999, 0.997), the 13 pruned heads (zero output) decay (0.12), the
    key-tagging head L0H6 stays high too (0.90; the other head the mechanism needs). ROC-AUC of
    the gates vs the ablation truth is 1.0 (also at 60 and 100 steps on 44 prompts); the test
    runs 30 steps (same ranking, less time) and asks 0.95, which tolerates a tie only."""
    model, recipe = load("zoo:retrieval"), RECIPES["retrieval"]
    batches = EVAL_BATCHES["retrieval"](recipe, 22, FRESH_SEED)
    res = streaming_gates(model, batches, steps=30, progress=False)
    truth = GroundTruth.load("zoo:retrieval")
    assert truth.retrieval is not None
    scored = truth.score_heads(res.head_gates.numpy())
    assert scored["auc_retrieval"] >= 0.95
    assert set(truth.retrieval.heads) <= set(res.full_heads)
    for layer, head in truth.retrieval.heads:
        assert float(res.head_gates[layer, head]) >= 0.8
    # agreement with the truth as a score grid
    grid = np.zeros((2, 8))
    for layer, head in truth.retrieval.heads:
        grid[layer, head] = 1.0
    agree = res.agreement(torch.tensor(grid), k=2)
    assert agree["auc"] == scored["auc_retrieval"] and agree["n_retrieval"] == 2


def test_result_round_trips_and_reports() -> None:
    model = load(TINY)
    res = streaming_gates(model, [_batch(seq=16), _batch(seq=10, seed=1)], sink=1, recent=3,
                          steps=4, keep_full=0.25, progress=False)  # fmt: skip
    assert res.gates.shape == (2, 4) and res.head_gates.shape == (2, 4)
    assert bool(((res.gates >= 0) & (res.gates <= 1)).all())
    assert len(res.full_heads) == 2  # 25% of 8 heads
    frame = res.to_frame()
    assert frame.columns.tolist() == ["layer", "head", "kv_head", "gate", "full"]
    assert int(frame["full"].sum()) == 2
    body = json.loads(json.dumps(res.payload(), allow_nan=False))
    assert np.array(body["scores"]).shape == (2, 4) and len(body["heads"]) == 2
    for view in ("gates", "kv", "loss"):
        assert res.figure(view=view).data  # type: ignore[arg-type]
    with pytest.raises(InputError):
        res.figure(view="nope")  # type: ignore[arg-type]
    store = Store(tempfile.mkdtemp())
    assert StreamingHeads.load(store, res.save(store)) == res

    class Scores:  # stands in for circuits.retrieval.RetrievalScores
        scores = res.head_gates * 0.5

    agree = res.agreement(Scores())
    assert agree["spearman"] == pytest.approx(1.0) or agree["spearman"] is None
    with pytest.raises(InputError):
        res.agreement(torch.zeros(3, 3))


def test_binarise_keeps_the_top_share() -> None:
    g = torch.tensor([[0.0, 0.2, 0.4, 0.6], [0.8, 1.0, 1.0, 0.1]])
    assert int(binarise(g, 0.25).sum()) == 2 and bool(binarise(g, 0.25)[1, 1:3].all())
    assert int(binarise(g, 0.5).sum()) == 4
    assert int(binarise(g, 0.0).sum()) == 0 and int(binarise(g, 1.0).sum()) == 8


@pytest.mark.parametrize(
    "kwargs",
    [{"sink": -1}, {"recent": -1}, {"recent": 0}, {"steps": 0}, {"lr": 0.0}, {"l1": -0.1},
     {"keep_full": 1.5}],
)  # fmt: skip
def test_bad_inputs_are_input_errors(tiny, kwargs) -> None:
    with pytest.raises(InputError):
        streaming_gates(tiny, _batch(), progress=False, **kwargs)


def test_bad_batches_and_tasks_are_input_errors(tiny) -> None:
    with pytest.raises(InputError, match="no batches"):
        streaming_gates(tiny, [], progress=False)
    with pytest.raises(InputError, match="unknown task"):
        default_run(tiny, task="ioi", progress=False)
    with pytest.raises(InputError, match="tokenizer"):
        default_run(tiny, progress=False)
