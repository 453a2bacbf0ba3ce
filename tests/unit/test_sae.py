"""Discrete-SAE circuit discovery (mechscope.circuits.sae), tested by its defining properties:
a planted difference in known heads gives exactly those heads the top node scores, identical
positives and negatives give all-zero scores, the same seed gives the same codes, and bad
inputs get errors that say what to change."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.circuits.graph import Circuit
from mechscope.circuits.sae import (
    SAECircuit,
    SAEConfig,
    default_run,
    discover,
    edge_scores,
    head_inputs,
    node_scores,
    sae_circuit,
    task_batch,
)
from mechscope.circuits.sae_model import DiscreteSAE
from mechscope.circuits.sae_train import input_scale, train_sae
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.probes import AddVector, intervene
from mechscope.store import Store
from mechscope.tasks import induction
from mechscope.tasks.base import TaskBatch

SPEC = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=1"


@pytest.fixture(scope="module")
def model():
    return load(SPEC)


def _prompts(n: int, length: int = 12, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 50, (n, length), generator=gen).tolist()


# -- the scores, by hand -------------------------------------------------------------------------


def test_node_scores_count_codes_used_only_on_positives() -> None:
    pos = torch.tensor([[1, 5, -1], [2, 5, 3]])
    neg = torch.tensor([[1, 5, 3], [1, 6, 4]])
    # head 0: {1,2} vs {1} -> 1; head 1: {5} vs {5,6} -> 0; head 2: {-1,3} vs {3,4} -> 1 ("none")
    assert node_scores(pos, neg).tolist() == [1.0, 0.0, 1.0]


def test_edge_scores_count_code_pairs_only_on_positives() -> None:
    pos = torch.tensor([[1, 2, 7], [3, 4, 7]])
    neg = torch.tensor([[1, 2, 7], [3, 9, 7]])
    e = edge_scores(pos, neg)
    assert torch.equal(e, e.T) and e.diagonal().eq(0).all()
    # (h0,h1): pairs {(1,2),(3,4)} vs {(1,2),(3,9)} -> 1; (h0,h2): {(1,7),(3,7)} both sides -> 0
    # (h1,h2): {(2,7),(4,7)} vs {(2,7),(9,7)} -> 1
    assert e[0, 1] == 1 and e[0, 2] == 0 and e[1, 2] == 1


def test_identical_codes_score_zero() -> None:
    codes = torch.randint(-1, 20, (6, 5), generator=torch.Generator().manual_seed(0))
    assert node_scores(codes, codes).eq(0).all() and edge_scores(codes, codes).eq(0).all()


# -- the SAE -----------------------------------------------------------------------------------


def test_sae_dictionary_stays_unit_norm_and_training_is_seeded() -> None:
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(3)) * 0.3
    sae, fit = train_sae(x, n_features=40, epochs=200, seed=5, progress=False)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(40), atol=1e-5)
    assert fit.fve > 0.5, fit  # it learns to reconstruct (inputs rescaled first)
    assert fit.scale == pytest.approx(input_scale(x))
    again, _ = train_sae(x, n_features=40, epochs=200, seed=5, progress=False)
    assert torch.equal(sae.codes(x), again.codes(x))
    rebuilt = DiscreteSAE.from_state(sae.state())
    assert torch.equal(rebuilt.codes(x), sae.codes(x))
    assert torch.allclose(rebuilt.decode(rebuilt.encode(x)), sae(x)[1])


def test_sae_rejects_nan_rows() -> None:
    with pytest.raises(InputError, match="NaN"):
        train_sae(torch.full((3, 4), float("nan")), epochs=1, progress=False)


# -- the method on a model ----------------------------------------------------------------------


def test_planted_heads_get_exactly_the_top_node_scores(model) -> None:
    """The same prompts on both sides; on the positives a vector is added to the outputs of two
    last-layer heads (nothing reads them afterwards), so only those heads differ."""
    prompts = _prompts(24)
    planted = [(1, 0), (1, 2)]
    gen = torch.Generator().manual_seed(1)
    specs = [AddVector(site="heads", layer=1, heads=(h,), vector=3.0 * torch.randn(8, generator=gen))
             for _, h in planted]  # fmt: skip
    x_neg = head_inputs(model, prompts, progress=False)
    with intervene(model, specs):
        x_pos = head_inputs(model, prompts, progress=False)
    result = discover(x_pos, x_neg, n_heads=4, progress=False)
    scores = result.node_scores
    assert all(scores[ly, h] > 0 for ly, h in planted)
    others = [scores[ly, h] for ly in range(2) for h in range(4) if (ly, h) not in planted]
    assert all(s == 0 for s in others), scores
    assert {(ly, h) for ly, h, _ in result.ranked_heads()[:2]} == set(planted)
    # the only pair of planted heads carries an edge; no pair without a planted head does
    e = result.edge_scores
    assert e[4, 6] > 0
    assert all(
        e[a, b] == 0 for a in range(8) for b in range(8) if a not in (4, 6) and b not in (4, 6)
    )


def test_identical_positives_and_negatives_give_all_zero_scores(model) -> None:
    prompts = _prompts(8)
    result = sae_circuit(model, (prompts, prompts), progress=False)
    assert result.node_scores.eq(0).all() and result.edge_scores.eq(0).all()
    assert result.ranked_edges() == []


def test_same_seed_same_codes(model) -> None:
    pos, neg = _prompts(8, seed=1), _prompts(8, seed=2)
    a = sae_circuit(model, (pos, neg), seed=3, progress=False)
    b = sae_circuit(model, (pos, neg), seed=3, progress=False)
    assert torch.equal(a.codes_pos, b.codes_pos) and torch.equal(a.codes_neg, b.codes_neg)
    assert torch.equal(a.node_scores, b.node_scores)


def test_reduce_mean_averages_real_positions_only(model) -> None:
    rows = [[3, 4, 5, 6], [7, 8]]
    x = head_inputs(model, rows, progress=False)
    alone = head_inputs(model, [[7, 8]], progress=False)
    assert torch.allclose(x[1], alone[0], atol=1e-5)  # right padding does not leak into the mean
    last = head_inputs(model, rows, reduce="answer", progress=False)
    assert last.shape == x.shape == (2, 8, 32)


def test_task_batch_drops_pairs_the_model_does_not_solve(model) -> None:
    b = induction(12, seq_len=5, d_vocab=50, seed=0)
    logits = model(b.clean)
    pred = b.answer_logits(logits).argmax(-1)
    solved = TaskBatch(task="planted", clean=b.clean, corrupt=b.corrupt, answer=pred,
                       corrupt_answer=b.corrupt_answer, answer_pos=b.answer_pos, seed=0)  # fmt: skip
    result = sae_circuit(model, solved, epochs=50, progress=False)
    corrupt_pred = b.answer_logits(model(b.corrupt)).argmax(-1)
    kept = int((corrupt_pred != pred).sum())
    assert result.pairs == {"pairs": 12, "clean_solved": 12, "corrupt_solved": 12 - kept,
                            "kept": kept}  # fmt: skip
    assert result.codes_pos.shape[0] == kept and result.task == "planted"


def test_result_round_trips_and_has_payload_figures_and_circuit(model, tmp_path) -> None:
    result = sae_circuit(
        model, (_prompts(6, seed=1), _prompts(6, seed=2)), epochs=50, progress=False
    )
    store = Store(tmp_path / "store")
    assert SAECircuit.load(store, result.save(store)) == result
    payload = result.payload()
    json.dumps(payload, allow_nan=False)
    assert len(payload["scores"]) == 2 and len(payload["scores"][0]) == 4
    assert payload["n_positive"] == 6 and set(payload["runtime"]) >= {
        "trace_s",
        "train_s",
        "total_s",
    }
    assert list(result.to_frame().columns) == [
        "layer",
        "head",
        "score",
        "rank",
        "codes_pos",
        "codes_neg",
    ]
    for view in ("nodes", "edges", "graph"):
        assert result.figure(view).data
    circuit = result.circuit(k=3)
    assert isinstance(circuit, Circuit) and len(circuit.heads) == 3


# -- bad input ---------------------------------------------------------------------------------


def test_fewer_than_two_positives_or_negatives(model) -> None:
    with pytest.raises(InputError, match="at least 2 positive"):
        sae_circuit(model, (_prompts(1), _prompts(3)), progress=False)
    with pytest.raises(InputError, match="at least 2 negative"):
        sae_circuit(model, (_prompts(3), _prompts(1)), progress=False)
    with pytest.raises(InputError, match="list of prompts"):
        sae_circuit(model, ("one prompt", _prompts(3)), progress=False)


def test_unequal_lengths_need_reduce_answer(model) -> None:
    pos, neg = _prompts(3, length=10), _prompts(3, length=12)
    with pytest.raises(InputError, match="equal token length") as err:
        sae_circuit(model, (pos, neg), progress=False)
    assert "reduce='answer'" in str(err.value)
    assert (
        sae_circuit(model, (pos, neg), reduce="answer", epochs=20, progress=False).reduce
        == "answer"
    )


def test_a_task_the_model_cannot_solve(model) -> None:
    b = induction(8, seq_len=5, d_vocab=50, seed=0)
    never = (b.answer_logits(model(b.clean)).argmax(-1) + 1) % 50  # never the model's top-1
    unsolvable = TaskBatch(task="induction", clean=b.clean, corrupt=b.corrupt, answer=never,
                           corrupt_answer=b.corrupt_answer, answer_pos=b.answer_pos, seed=0)  # fmt: skip
    with pytest.raises(InputError, match="cannot solve task 'induction'.*0 of 8") as err:
        sae_circuit(model, unsolvable, progress=False)
    assert "pick a task" in str(err.value)


def test_bad_config_and_task_names(model) -> None:
    with pytest.raises(InputError, match="reduce must be"):
        SAEConfig(reduce="max")
    with pytest.raises(InputError, match="n_train must be >= 1"):
        SAEConfig(n_train=0)
    with pytest.raises(InputError, match="no tokenizer"):
        task_batch(model, "ioi")
    zoo = load("zoo:ioi")
    with pytest.raises(InputError, match="--task ioi"):
        task_batch(zoo, "induction")


def test_default_run_on_a_zoo_model_finds_its_circuit() -> None:
    """zoo:retrieval: the two copy heads the truth names are the only heads with a score."""
    from mechscope.models.zoo.groundtruth import GroundTruth

    zoo = load("zoo:retrieval")
    result = default_run(zoo, n=24, progress=False)
    truth = GroundTruth.load("zoo:retrieval")
    assert truth.score_heads(result.node_scores.numpy())["auc_circuit"] == 1.0
    assert {(ly, h) for ly, h, s in result.ranked_heads() if s > 0} == set(truth.circuit_heads)
