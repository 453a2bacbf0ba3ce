"""Zoo ground truth v2: patching tables against TransformerLens's ``patching`` (the oracle), the
defining properties of the normalised metric, the typed ``GroundTruth`` file, detector scoring on
hand-made tables, and the retrieval heads found by ablation.

The oracle metric below is written out here (logits -> logit difference by indexing), not taken
from mechscope, so a wrong baseline or direction in the library shows up as a mismatch.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from transformer_lens import patching

from mechscope.models.zoo import RECIPES, load_zoo, zoo_card, zoo_names
from mechscope.models.zoo.data import EVAL_BATCHES, PATCH_BATCHES
from mechscope.models.zoo.groundtruth import GroundTruth, concordance
from mechscope.models.zoo.truth import (
    accuracy,
    patching_effects,
    patching_metric,
    patching_tables,
    retrieval_ablation,
    uniform_attention,
)
from mechscope.tasks.base import TaskBatch

FRESH_SEED = 777
ATOL = 1e-5


def _ld(batch: TaskBatch, logits: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    at = logits[rows, batch.answer_pos]  # [batch, vocab]
    return (at[rows, batch.answer] - at[rows, batch.corrupt_answer]).mean()


def _oracle_metrics(model, batch: TaskBatch):
    with torch.no_grad():
        clean, corrupt = float(_ld(batch, model(batch.clean))), float(_ld(batch, model(batch.corrupt)))
    return ({"denoise": lambda lg: (_ld(batch, lg) - corrupt) / (clean - corrupt),
             "noise": lambda lg: (clean - _ld(batch, lg)) / (clean - corrupt)},
            {"denoise": batch.corrupt, "noise": batch.clean})  # fmt: skip


def _caches(model, batch: TaskBatch):
    with torch.no_grad():
        _, clean = model.run_with_cache(batch.clean)
        _, corrupt = model.run_with_cache(batch.corrupt)
    return {"denoise": clean, "noise": corrupt}


@pytest.fixture(scope="module")
def induction():
    model = load_zoo("induction")
    batch = PATCH_BATCHES["induction"](RECIPES["induction"], 4, FRESH_SEED)[0]
    return model, batch, patching_tables(model, batch)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_head_and_resid_tables_equal_transformer_lens(induction, direction: str) -> None:
    model, batch, tables = induction
    metrics, tokens = _oracle_metrics(model, batch)
    cache = _caches(model, batch)[direction]
    args = (model, tokens[direction], cache, metrics[direction])
    oracle = {
        "head": patching.get_act_patch_attn_head_out_all_pos(*args),  # [layer, head]
        "head_pos": patching.get_act_patch_attn_head_out_by_pos(*args),  # [layer, pos, head]
        "resid_pre": patching.get_act_patch_resid_pre(*args),  # [layer, pos]
    }
    for name, want in oracle.items():
        got = tables[f"{name}_{direction}"]
        assert got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.double().numpy(), atol=ATOL, err_msg=name)
    assert np.abs(tables[f"head_{direction}"]).max() > 0.1  # the comparison is not of zeros


def _replace_all(corrupted: torch.Tensor, index: object, clean: torch.Tensor) -> torch.Tensor:
    corrupted[...] = clean
    return corrupted


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_mlp_tables_equal_transformer_lens(direction: str) -> None:
    model = load_zoo("facts")
    batch = PATCH_BATCHES["facts"](RECIPES["facts"], 8, FRESH_SEED)[0]
    tables = patching_tables(model, batch)
    metrics, tokens = _oracle_metrics(model, batch)
    args = (model, tokens[direction], _caches(model, batch)[direction], metrics[direction])
    by_pos = patching.get_act_patch_mlp_out(*args)
    all_pos = patching.generic_activation_patch(
        *args, patch_setter=partial(_replace_all), activation_name="mlp_out",
        index_axis_names=("layer",))  # fmt: skip
    np.testing.assert_allclose(tables[f"mlp_pos_{direction}"], by_pos.double().numpy(), atol=ATOL)
    np.testing.assert_allclose(tables[f"mlp_{direction}"], all_pos.double().numpy(), atol=ATOL)
    heads = patching.get_act_patch_attn_head_out_all_pos(*args)
    np.testing.assert_allclose(tables[f"head_{direction}"], heads.double().numpy(), atol=ATOL)
    assert np.abs(tables[f"mlp_{direction}"]).max() > 0.1


def test_metric_is_zero_and_one_at_the_baselines(induction) -> None:
    model, batch, _ = induction
    with torch.no_grad():
        clean, corrupt = model(batch.clean), model(batch.corrupt)
    denoise = patching_metric(batch, clean, corrupt, "denoise")
    noise = patching_metric(batch, clean, corrupt, "noise")
    assert float(denoise(corrupt)) == 0.0 and float(denoise(clean)) == 1.0
    assert float(noise(clean)) == 0.0 and float(noise(corrupt)) == 1.0


def test_restoring_every_position_of_resid_pre_0_restores_the_run(induction) -> None:
    model, batch, tables = induction
    for direction in ("denoise", "noise"):
        (effect,) = patching_effects(model, batch, [("resid_pre", 0, None, None)], direction)
        assert abs(effect - 1.0) < 1e-6, direction
    # a patch before the first corrupted token writes what is already there: exactly 0
    first = int((batch.clean != batch.corrupt).any(0).nonzero()[0])
    assert first >= 1
    assert np.all(tables["resid_pre_denoise"][:, :first] == 0)
    assert np.all(tables["head_pos_noise"][:, :first] == 0)


# --------------------------------------------------------------------------------------------
# the shipped files


@pytest.mark.parametrize("name", zoo_names())
def test_shipped_ground_truth_loads_and_round_trips(name: str) -> None:
    card = zoo_card(name)
    raw = json.loads((card.directory / "ground_truth.json").read_text())
    truth = GroundTruth.load(f"zoo:{name}")
    assert truth.to_dict() == raw
    assert GroundTruth.from_dict(json.loads(json.dumps(truth.to_dict()))).to_dict() == raw
    n_layers, n_heads = card.config["n_layers"], card.config["n_heads"]
    assert truth.head_denoise.shape == truth.head_noise.shape == (n_layers, n_heads)
    assert [list(h) for h in truth.circuit_heads] == card.card["circuit_heads"]
    assert truth.by_position, "per-position tables are stored"
    for t in truth.by_position:
        b, pos = t.batch.shape
        assert t.head_denoise.shape == t.head_noise.shape == (n_layers, pos, n_heads)
        assert t.resid_pre_denoise.shape == t.resid_pre_noise.shape == (n_layers, pos)
        assert (t.mlp_denoise is None) == bool(card.config.get("attn_only"))
        assert t.batch.batch().clean.shape == (b, pos)  # regenerates, checksum checked


def test_shipped_ioi_position_tables_equal_transformer_lens() -> None:
    """The stored per-position tables are what the oracle computes on the regenerated batch."""
    truth = GroundTruth.load("zoo:ioi")
    model = load_zoo("ioi")
    (stored,) = truth.by_position
    batch = stored.batch.batch()
    metrics, tokens = _oracle_metrics(model, batch)
    cache = _caches(model, batch)
    for direction, head, resid in (("denoise", stored.head_denoise, stored.resid_pre_denoise),
                                   ("noise", stored.head_noise, stored.resid_pre_noise)):  # fmt: skip
        args = (model, tokens[direction], cache[direction], metrics[direction])
        want = patching.get_act_patch_attn_head_out_by_pos(*args).double().numpy()
        np.testing.assert_allclose(head, want, atol=2e-6)
        want = patching.get_act_patch_resid_pre(*args).double().numpy()
        np.testing.assert_allclose(resid, want, atol=2e-6)


# --------------------------------------------------------------------------------------------
# scoring detectors


def _toy_truth(effect: np.ndarray, circuit: list[tuple[int, int]]) -> GroundTruth:
    base = GroundTruth.load("zoo:induction").to_dict()
    base["patching"]["head_out_denoise"] = effect.tolist()
    base["patching"]["head_out_noise"] = (-effect / 2).tolist()
    base["circuit_heads"] = [list(h) for h in circuit]
    return GroundTruth.from_dict(base)


def test_score_heads_on_hand_made_tables() -> None:
    effect = np.array([[0.9, 0.0, 0.05, 0.1], [0.3, 0.25, 0.15, 0.5]])
    truth = _toy_truth(effect, [(0, 0), (1, 0), (1, 1), (1, 3)])
    perfect = truth.score_heads(effect * 3 + 1)  # any increasing map of the effect
    assert perfect == {"auc_circuit": 1.0, "concordance_effect": 1.0, "recall_at_k": 1.0}
    reverse = truth.score_heads(-effect)
    assert reverse["auc_circuit"] == 0.0 and reverse["concordance_effect"] == 0.0
    assert reverse["recall_at_k"] == 0.0
    const = truth.score_heads(np.ones_like(effect))
    assert const["auc_circuit"] == 0.5 and const["concordance_effect"] == 0.5
    # a detector that finds the circuit but ranks it wrongly inside: AUC 1, concordance < 1
    inside = np.where(truth.circuit_mask(), 2.0 - effect, 0.0)
    got = truth.score_heads(inside)
    assert got["auc_circuit"] == 1.0 and 0.5 < got["concordance_effect"] < 1.0
    with pytest.raises(Exception, match="layer, head"):
        truth.score_heads(np.zeros(3))


def test_concordance_counts_pairs() -> None:
    # truth 0 < 1 < 2 < 3; scores swap the middle pair: 5 of 6 pairs concordant
    assert concordance([0, 1, 2, 3], [0, 2, 1, 3]) == pytest.approx(5 / 6)
    assert concordance([0, 1, 2, 3], [0, 2, 1, 3], min_gap=1.5) == 1.0  # only far pairs
    assert np.isnan(concordance([1, 1], [0, 1]))


def test_shipped_detector_scores_against_the_truth() -> None:
    """The induction score finds layer-1 circuit heads, the previous-token score L0H0."""
    truth = GroundTruth.load("zoo:induction")
    ind = truth.score_heads(truth.head_scores["induction"])
    assert ind["auc_circuit"] >= 0.7
    prev = truth.head_scores["previous_token"]
    assert int(np.argmax(prev[0])) == int(np.argmax(truth.effect()[0])) == 0


# --------------------------------------------------------------------------------------------
# retrieval heads


def test_retrieval_ablation_finds_the_copy_heads() -> None:
    model, recipe = load_zoo("retrieval"), RECIPES["retrieval"]
    batches = EVAL_BATCHES["retrieval"](recipe, 44, FRESH_SEED)
    scores = {"local": np.zeros((2, 8)).tolist()}
    found = retrieval_ablation(model, batches, scores, [], seed=FRESH_SEED, draws=2)
    assert set(found.heads) == {(1, 4), (1, 6)}
    assert found.baseline - found.uniform_alone[1, 4] >= 0.3  # the main copy head
    assert found.uniform_all < 0.2
    assert found.heads_uniform is not None and found.heads_uniform < 0.2
    # random other heads cost nothing (the others were pruned: exactly the baseline)
    assert all(a >= found.baseline - 1e-9 for a in found.random_other_heads_uniform)
    live_other = [(0, 6)]  # the key-tagging head: needed, but not at the answer position
    at_answer = accuracy(model, batches,
                         lambda b: uniform_attention(live_other, b.answer_pos[:, None]))  # fmt: skip
    assert at_answer >= found.baseline - 0.05
    shipped = GroundTruth.load("zoo:retrieval")
    assert shipped.retrieval is not None and set(shipped.retrieval.heads) == {(1, 4), (1, 6)}
    assert shipped.score_heads(shipped.head_scores["copy"])["auc_retrieval"] == 1.0


def test_a_zoo_card_gives_its_typed_ground_truth():
    from mechscope.models.zoo import zoo_card
    from mechscope.models.zoo.groundtruth import GroundTruth

    truth = zoo_card("induction").ground_truth()
    assert isinstance(truth, GroundTruth)
    assert [list(h) for h in truth.circuit_heads] == [list(h) for h in zoo_card("induction").circuit_heads]
