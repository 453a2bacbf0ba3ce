"""The circuit evaluation harness (mechscope.circuits.evaluate): ROC-AUC, precision/recall at k and
rank correlation on hand-made rankings, then every method on the zoo's IOI checkpoint against its
ground truth (exact patching on the truth's own batch recovers it exactly), the exact-patching
reference for a model without a truth, the Result contract and bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mechscope.circuits import evaluate as ev
from mechscope.circuits.evaluate import (
    METHODS,
    CircuitEvaluation,
    evaluate_methods,
    ranking_metrics,
    sae_agreement,
    top_k_overlap,
)
from mechscope.circuits.sae import SAEConfig, task_batch
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.models.zoo.groundtruth import GroundTruth, batch_checksum
from mechscope.results import Result
from mechscope.store import Store

FAST = SAEConfig(epochs=100)


# -- metrics on hand-made rankings --------------------------------------------------------------


def auc(scores, members):
    return ranking_metrics([scores], [members])["roc_auc"]


def test_roc_auc_perfect_reversed_tied_and_a_worked_case():
    members = [True, True, False, False]
    assert auc([4.0, 3.0, 2.0, 1.0], members) == 1.0
    assert auc([1.0, 2.0, 3.0, 4.0], members) == 0.0
    assert auc([1.0, 1.0, 1.0, 1.0], members) == 0.5
    # member-nonmember pairs: (4,3) yes, (4,1) yes, (2,3) no, (2,1) yes -> 3 of 4
    assert auc([4.0, 2.0, 3.0, 1.0], members) == 0.75
    # one tie among the pairs counts one half: (4,3) (4,1) (3,3)=1/2 (3,1) -> 3.5 of 4
    assert auc([4.0, 3.0, 3.0, 1.0], members) == 0.875


def test_precision_and_recall_at_k_with_k_the_circuit_size():
    m = ranking_metrics([[0.9, 0.1], [0.8, 0.2]], [[True, False], [False, True]])
    assert (m["k"], m["precision_at_k"], m["recall_at_k"]) == (2, 0.5, 0.5)
    perfect = ranking_metrics([[0.9, 0.1], [0.2, 0.8]], [[True, False], [False, True]])
    assert perfect["precision_at_k"] == perfect["recall_at_k"] == 1.0


def test_heads_tied_at_the_cut_share_the_remaining_places():
    # k = 2: one head above the cut, two tied at it for the one place left (half a member each)
    m = ranking_metrics([[3.0, 1.0, 1.0, 0.0]], [[True, True, False, False]])
    assert m["precision_at_k"] == m["recall_at_k"] == 0.75
    # constant scores: every head gets k/n of a place
    m = ranking_metrics([[1.0, 1.0, 1.0, 1.0]], [[True, False, False, False]])
    assert m["recall_at_k"] == 0.25


def test_effect_metrics_rank_correlation_and_concordance():
    effect = np.array([[0.5, -0.1], [0.3, 0.0]])  # compared by |effect|
    members = [[True, False], [True, False]]
    same = ranking_metrics(np.abs(effect), members, effect)
    assert same["spearman_effect"] == pytest.approx(1.0)
    assert same["concordance_effect"] == 1.0
    rev = ranking_metrics(-np.abs(effect), members, effect)
    assert rev["spearman_effect"] == pytest.approx(-1.0)
    assert rev["concordance_effect"] == 0.0
    flat = ranking_metrics(np.ones((2, 2)), members, effect)
    assert math.isnan(flat["spearman_effect"]) and flat["concordance_effect"] == 0.5
    assert "spearman_effect" not in ranking_metrics(np.ones((2, 2)), members)


def test_top_k_overlap_and_sae_agreement():
    ref = np.array([[0.9, 0.1, 0.8, 0.0]])
    assert top_k_overlap([[3.0, 2.0, 1.0, 0.0]], ref, 2) == 0.5
    assert top_k_overlap(ref, ref, 2) == 1.0
    assert top_k_overlap(np.zeros((1, 4)), ref, 2) == 0.5  # constant scores: chance, k / n
    agree = sae_agreement(np.arange(30.0).reshape(3, 10), np.arange(30.0).reshape(3, 10))
    assert agree["spearman"] == pytest.approx(1.0)
    assert agree["overlap_at_5"] == agree["overlap_at_20"] == 1.0
    assert agree["heads_at_10"] == 10 and agree["chance_at_20"] == pytest.approx(400 / 30)
    assert "overlap_at_5" not in sae_agreement(np.eye(2), np.eye(2))  # k >= every head: left out


@pytest.mark.parametrize(
    ("scores", "members", "effect", "match"),
    [
        (np.ones((2, 3)), np.ones((3, 2), bool), None, "members has shape"),
        (np.ones((2, 2)), np.zeros((2, 2), bool), None, "member set is empty"),
        (np.ones((2, 2)), np.full((2, 2), 0.5), None, "booleans"),
        (np.array([[1.0, np.nan]]), np.array([[True, False]]), None, "NaN or infinite"),
        (np.ones(4), np.ones(4, bool), None, r"\[layer, head\]"),
        (np.ones((2, 2)), np.eye(2, dtype=bool), np.ones((2, 3)), "effect has shape"),
    ],
)
def test_bad_inputs_say_what_to_change(scores, members, effect, match):
    with pytest.raises(InputError, match=match):
        ranking_metrics(scores, members, effect)


# -- the harness on the zoo ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ioi():
    return load("zoo:ioi")


@pytest.fixture(scope="module")
def ioi_eval(ioi):
    truth = GroundTruth.load("zoo:ioi")
    spec = truth.batches[0]  # the batch the truth was computed on: task_batch regenerates it
    return evaluate_methods(ioi, n=spec.n, seed=spec.seed, sae_config=FAST, progress=False)


def test_task_batch_is_the_truths_own_patch_batch(ioi):
    truth = GroundTruth.load("zoo:ioi")
    (spec,) = truth.batches
    assert batch_checksum(task_batch(ioi, None, spec.n, spec.seed)) == spec.sha1


def test_every_method_on_zoo_ioi_and_exact_patching_recovers_the_truth(ioi_eval):
    names = [m.name for m in ioi_eval.methods]
    assert names == ["sae", "patching", "attribution"]
    assert "no head-analysis detector" in ioi_eval.skipped["detector"]
    assert ioi_eval.reference.startswith("ground truth zoo:ioi (exact head patching")
    # the truth IS exact head patching on this very batch: the same scores, a perfect ranking
    patching = ioi_eval.method("patching")
    assert torch.allclose(patching.scores, ioi_eval.effect, atol=1e-3)
    assert patching.metrics["roc_auc"] == 1.0 and patching.metrics["concordance_effect"] == 1.0
    assert patching.metrics["recall_at_k"] == 1.0 and patching.metrics["k"] == 2
    for m in ioi_eval.methods:
        assert m.scores.shape == (3, 4) and m.runtime_s > 0
        assert 0.0 <= m.metrics["roc_auc"] <= 1.0
    assert set(ioi_eval.agreement) >= {"spearman", "overlap_at_5", "chance_at_5", "overlap_at_10"}


def test_payload_frame_figures_and_store_round_trip(ioi_eval, tmp_path):
    payload = ioi_eval.payload()
    json.dumps(payload, allow_nan=False)
    assert set(payload["methods"]) == {"sae", "patching", "attribution"}
    assert payload["methods"]["patching"]["roc_auc"] == 1.0
    assert {"runtime_s", "precision_at_k", "spearman_effect"} <= set(payload["methods"]["sae"])
    assert payload["circuit_heads"] == [[1, 0], [1, 3]]
    frame = ioi_eval.to_frame()
    assert frame["method"].tolist() == ["sae", "patching", "attribution"]
    assert {"roc_auc", "recall_at_k", "runtime_s"} <= set(frame.columns)
    bars = ioi_eval.figure()
    assert [t.type for t in bars.data] == ["bar"] * 3 and list(bars.data[0].x) == list(ev.METRICS)
    heat = ioi_eval.figure(view="scores")
    assert [t.type for t in heat.data] == ["heatmap"] * 4  # 3 methods + the reference
    with pytest.raises(InputError, match="view"):
        ioi_eval.figure(view="nodes")
    store = Store(tmp_path)
    run_id = ioi_eval.save(store)
    back = CircuitEvaluation.load(store, run_id)
    assert back == ioi_eval and Result.load(store, run_id) == ioi_eval
    assert back.payload() == payload


def test_without_a_truth_the_reference_is_exact_patching_on_the_batch(ioi, monkeypatch):
    monkeypatch.setattr(ev, "_zoo_truth", lambda model: None)
    res = evaluate_methods(ioi, n=16, methods=["attribution", "patching"], progress=False)
    assert res.reference.startswith("exact head patching on the same batch")
    assert torch.equal(res.effect, res.method("patching").scores)
    assert res.method("patching").metrics["roc_auc"] == 1.0
    assert res.method("patching").metrics["spearman_effect"] == pytest.approx(1.0)
    assert res.agreement == {}  # no SAE run: nothing to compare with patching
    assert bool(res.members.any())
    json.dumps(res.payload(), allow_nan=False)


def test_patching_reference_without_a_head_over_the_threshold_keeps_the_top_heads():
    members, rule = ev._patching_members(torch.tensor([[0.1, 0.02], [0.06, 0.0]]))
    assert members.tolist() == [[True, False], [True, False]] and "half" in rule


@pytest.mark.parametrize(("name", "n", "kind"), [("induction", 16, "previous-token"),
                                                 ("retrieval", 11, "retrieval score")])  # fmt: skip
def test_the_head_analysis_detectors_rank_the_zoo_circuits(name, n, kind):
    # induction: max(induction, previous-token score), the circuit holds both kinds of head;
    # retrieval: the needle (one token per depth batch) found where clean and corrupt differ
    res = evaluate_methods(load(f"zoo:{name}"), n=n, methods=["detector"], progress=False)
    assert [m.name for m in res.methods] == ["detector"] and res.skipped == {}
    assert kind in res.method("detector").note
    assert res.method("detector").metrics["roc_auc"] == 1.0
    assert res.agreement == {}


def test_unknown_methods_and_wrong_truths_are_refused(ioi):
    with pytest.raises(InputError, match="choose from") as err:
        evaluate_methods(ioi, methods=["sae", "acdc"], progress=False)
    assert all(m in str(err.value) for m in METHODS)
    with pytest.raises(InputError, match="none given"):
        evaluate_methods(ioi, methods=[], progress=False)
    with pytest.raises(InputError, match="heads but the model"):
        evaluate_methods(ioi, truth=GroundTruth.load("zoo:induction"), progress=False)


def test_a_computed_sae_result_is_reused_not_trained_again(monkeypatch):
    from mechscope.circuits.sae import sae_circuit

    zoo = load("zoo:ioi")
    res = sae_circuit(zoo, task_batch(zoo, n=16), config=FAST, progress=False)
    monkeypatch.setitem(ev.RUNNERS, "sae", lambda *a: pytest.fail("the SAE was trained again"))
    out = evaluate_methods(zoo, n=16, methods=["sae"], sae_config=FAST, sae_result=res,
                           progress=False)  # fmt: skip
    sae = out.method("sae")
    assert torch.equal(sae.scores, res.node_scores) and sae.runtime_s == res.runtime["total_s"]
    with pytest.raises(InputError, match="computed on task 'ioi_synthetic'"):
        evaluate_methods(load("zoo:induction"), n=8, methods=["sae"], sae_result=res,
                         progress=False)  # fmt: skip
