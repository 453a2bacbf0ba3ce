"""Retrieval heads (mechscope.circuits.retrieval): the copy-paste rule on planted argmaxes, the
engine (key/value cache) path equal to the hooks path, the zoo ground truth recovered, masking,
the Result contract and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.circuits.retrieval import (
    RetrievalScores,
    copy_events,
    default_run,
    masking_validation,
    needle_positions,
    retrieval_grid_scores,
    retrieval_scores,
    rouge1_recall,
)
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.models.zoo import zoo_card
from mechscope.results import Result
from mechscope.store import Store
from mechscope.tasks import retrieval
from mechscope.tasks.base import TaskBatch
from mechscope.tasks.retrieval import RetrievalVocab

GQA = ("native:n_layers=3,d_model=32,n_heads=4,d_head=8,d_vocab=50,n_ctx=40,seed=3,d_mlp=64,"
       "positional_embedding_type=rotary,n_key_value_heads=2,normalization_type=RMS,gated_mlp=true,"
       "act_fn=silu")  # fmt: skip


@pytest.fixture(scope="module")
def zoo():
    return load("zoo:retrieval")


@pytest.fixture(scope="module")
def zoo_scores(zoo):
    return default_run(zoo, n=22, progress=False)


# -- the rule on planted argmaxes -------------------------------------------------------------


def _score(argmaxes, generated, needle_pos, tokens):
    """Trial score of every head over steps, the way retrieval_scores aggregates."""
    copied = None
    for arg, w in zip(argmaxes, generated, strict=True):
        ev = copy_events(arg, w, needle_pos, tokens)
        copied = ev if copied is None else copied | ev
    return copied.sum(-1).float() / (needle_pos >= 0).sum(1)[:, None, None]


def test_a_planted_argmax_on_the_needle_token_scores_one_over_the_needle_length():
    tokens = torch.tensor([[9, 9, 5, 6, 7, 8, 9, 9]])  # needle 5 6 7 8 at positions 2..5
    needle = torch.tensor([[2, 3, 4, 5]])
    # 1 layer x 3 heads; step 0 generates 5, step 1 generates 6
    arg0 = torch.tensor([[[2, 2, 0]]])  # heads 0 and 1 on the needle position holding 5
    arg1 = torch.tensor([[[3, 2, 3]]])  # head 0 and head 2 on the position holding 6
    s = _score([arg0, arg1], [torch.tensor([5]), torch.tensor([6])], needle, tokens)
    assert s[0, 0].tolist() == [0.5, 0.25, 0.25]


def test_off_needle_argmax_and_a_needle_position_holding_another_token_score_zero():
    tokens = torch.tensor([[5, 9, 5, 6, 7, 8]])  # position 0 also holds 5, but is not the needle
    needle = torch.tensor([[2, 3, 4, 5]])
    arg = torch.tensor([[[0, 3, 1]]])  # off-needle 5, needle position holding 6, filler
    s = _score([arg], [torch.tensor([5])], needle, tokens)
    assert s.abs().sum() == 0
    # generating a token that is not in the needle never copies
    assert not copy_events(torch.tensor([[[2]]]), torch.tensor([1]), needle, tokens).any()


def test_a_position_copied_twice_counts_once_and_padding_never_copies():
    tokens = torch.tensor([[0, 4, 4, 3], [0, 4, 3, 3]])
    needle = torch.tensor([[1, 2], [1, -1]])  # row 1: a one-token needle
    arg = torch.tensor([[[1]], [[0]]])
    s = _score([arg, arg], [torch.tensor([4, 0]), torch.tensor([4, 0])], needle, tokens)
    assert s[:, 0, 0].tolist() == [0.5, 0.0]  # padding (-1) clamps to position 0 but never hits


def test_rouge1_recall_counts_needle_tokens_as_a_multiset():
    assert rouge1_recall([[1, 2, 2, 9]], [[2, 2, 2, 3]]).tolist() == [0.5]
    assert rouge1_recall([[3]], [[3]]).tolist() == [1.0]


# -- the model paths ---------------------------------------------------------------------------


def test_engine_path_equals_hooks_path_on_a_rotary_gqa_model():
    model = load(GQA)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (3, 24), generator=g)
    batch = TaskBatch(task="toy", clean=clean, corrupt=clean, answer=clean[:, 5],
                      corrupt_answer=clean[:, 5], answer_pos=torch.full((3,), 23), seed=0)  # fmt: skip
    spans = [(5, 9), (10, 13), (2, 8)]
    eng = retrieval_scores(model, batch, needle_spans=spans, max_new_tokens=5, progress=False)
    hooks = retrieval_scores(model, batch, needle_spans=spans, max_new_tokens=5, engine="hooks",
                             progress=False)  # fmt: skip
    assert eng.work["path"] == "engine" and hooks.work["path"] == "hooks"
    assert eng.generations == hooks.generations
    assert torch.equal(eng.per_trial, hooks.per_trial)
    assert torch.equal(eng.step_copies, hooks.step_copies)
    assert torch.equal(eng.scores, hooks.scores)
    assert eng.step_copies.shape == (3, 5) and all(len(g) == 5 for g in eng.generations)


def test_engine_path_equals_hooks_path_on_the_zoo(zoo):
    vocab = RetrievalVocab()
    batches = [retrieval(6, context_len=64, depth=d, seed=1, vocab=vocab, n_distractors=4)
               for d in (0.0, 0.7)]  # fmt: skip
    a = retrieval_scores(zoo, batches, progress=False)
    b = retrieval_scores(zoo, batches, engine="hooks", progress=False)
    assert a.work["path"] == "engine" and a.work["gate"]["argmax_mismatch"] == 0
    assert torch.equal(a.per_trial, b.per_trial) and torch.equal(a.scores, b.scores)


def test_the_zoo_retrieval_heads_rank_at_the_top(zoo_scores):
    truth = zoo_card("retrieval").ground_truth()
    assert truth.retrieval is not None
    assert zoo_scores.n_answered >= 0.8 * len(zoo_scores.answered)
    assert truth.score_heads(zoo_scores.scores.numpy())["auc_retrieval"] >= 0.95
    assert set(zoo_scores.heads) == set(truth.retrieval.heads)
    assert zoo_scores.work["path"] == "engine"


def test_masking_the_top_heads_costs_more_than_random_heads(zoo, zoo_scores):
    batch = retrieval(16, context_len=128, depth=0.5, seed=3, vocab=RetrievalVocab())
    m = masking_validation(zoo, batch, zoo_scores, k=2, n_random=3, seed=0)
    assert m.baseline >= 0.9
    assert m.top_accuracy < min(m.random_accuracy) - 0.5 or m.top_accuracy < 0.2
    assert m.top_accuracy < sum(m.random_accuracy) / 3
    assert set(m.top_heads) == {(1, 4), (1, 6)}
    assert all(not set(d) & set(m.top_heads) for d in m.random_heads)
    assert len(m.to_frame()) == 5 and m.figure().data


def test_grid_scores_cover_lengths_by_depths(zoo):
    r = retrieval_grid_scores(zoo, None, [48, 64], [0.0, 1.0], n=2, n_distractors=4, progress=False)
    assert len(r.cells) == 8 and {c["context_len"] for c in r.cells} == {48, 64}
    assert r.scores.shape == (2, 8)


# -- the Result --------------------------------------------------------------------------------


def test_result_contract(zoo_scores, tmp_path):
    r = zoo_scores
    assert r.scores.shape == (2, 8) and r.per_trial.shape == (len(r.answered), 2, 8)
    assert r.heads[0] == (1, 4) and r.share_above() == len(r.heads) / 16
    assert r.share_above(2.0) == 0.0
    body = json.loads(json.dumps(r.payload()))
    assert set(body) >= {"scores", "heads", "share", "n_trials", "n_answered", "path"}
    assert body["heads"][0] == [1, 4] and len(body["scores"]) == 2
    assert len(r.to_frame()) == 16
    assert r.figure().data and r.figure(view="trials").data
    with pytest.raises(InputError, match="view"):
        r.figure(view="nope")
    store = Store(tmp_path)
    assert Result.load(store, r.save(store)) == r
    assert isinstance(r, RetrievalScores)


# -- bad inputs --------------------------------------------------------------------------------


def _toy(t=12, rows=1):
    clean = torch.arange(t).repeat(rows, 1) % 50
    return TaskBatch(task="toy", clean=clean, corrupt=clean, answer=clean[:, 0],
                     corrupt_answer=clean[:, 0], answer_pos=torch.full((rows,), t - 1), seed=0)  # fmt: skip


def test_bad_inputs_are_refused_with_the_fix(zoo, monkeypatch):
    tiny = load(GQA)
    with pytest.raises(InputError, match="no batches"):
        retrieval_scores(tiny, [], progress=False)
    with pytest.raises(InputError, match="outside the prompt"):
        retrieval_scores(tiny, _toy(), needle_spans=[(10, 14)], progress=False)
    with pytest.raises(InputError, match="longer than the context"):
        needle_positions(_toy(), needle_spans=[(0, 20)])
    with pytest.raises(InputError, match="no known needle"):
        retrieval_scores(tiny, _toy(), progress=False)
    with pytest.raises(InputError, match="exceed the model's context"):
        retrieval_scores(tiny, _toy(t=38), needle_spans=[(2, 8)], progress=False)
    padded = TaskBatch(task="toy", clean=_toy(rows=2).clean, corrupt=_toy(rows=2).clean,
                       answer=torch.tensor([0, 0]), corrupt_answer=torch.tensor([0, 0]),
                       answer_pos=torch.tensor([5, 9]), seed=0, lengths=torch.tensor([6, 12]))  # fmt: skip
    with pytest.raises(InputError, match="equal lengths"):
        retrieval_scores(tiny, padded, needle_spans=[(1, 3), (1, 3)], progress=False)
    scores = torch.zeros(2, 8)
    batch = retrieval(2, context_len=64, vocab=RetrievalVocab(), n_distractors=2)
    with pytest.raises(InputError, match="16 heads"):
        masking_validation(zoo, batch, scores, k=17)
    with monkeypatch.context() as m:  # a bridge without hook_pattern points
        m.setattr(type(zoo), "hook_dict", property(lambda self: {}))
        with pytest.raises(InputError, match="attention pattern hook"):
            retrieval_scores(zoo, batch, progress=False)
    with pytest.raises(InputError, match="--needle"):
        default_run(tiny, prompts=["some text"], progress=False)
    with pytest.raises(InputError, match="--task retrieval"):
        default_run(tiny, task="induction", progress=False)
    with pytest.raises(InputError, match="engine"):
        retrieval_scores(tiny, _toy(), needle_spans=[(1, 3)], engine="fast", progress=False)


def test_on_the_induction_zoo_induction_heads_score_near_one_and_previous_token_heads_near_zero():
    """METHODS.md section 3: in a trained induction model, induction heads score near 1 and
    previous-token heads near 0. The needle is the first copy's token that the second copy asks
    for (``[BOS] R R[:-1]`` -> ``R[L-1]``)."""
    from mechscope.models.zoo.groundtruth import GroundTruth
    from mechscope.models.zoo.recipes import RECIPES
    from mechscope.tasks import induction

    model, truth = load("zoo:induction"), GroundTruth.load("zoo:induction")
    seq = RECIPES["induction"].task_args["eval_repeat"]
    b = induction(16, seq_len=seq, d_vocab=int(model.cfg.d_vocab), seed=3)
    at = int(b.meta["first_start"]) + seq - 1  # R[L-1] in the first copy
    assert bool((b.clean[:, at] == b.answer).all())
    res = retrieval_scores(model, b, needle_spans=[(at, at + 1)] * 16, max_new_tokens=1,
                           progress=False)  # fmt: skip
    assert res.n_answered >= 12
    induction_heads = [(1, h) for h in range(4) if truth.head_scores["induction"][1, h] > 0.5]
    prev_heads = [(0, h) for h in range(4) if truth.head_scores["previous_token"][0, h] > 0.5]
    assert induction_heads and prev_heads
    assert all(float(res.scores[h]) >= 0.8 for h in induction_heads), res.scores
    assert all(float(res.scores[h]) <= 0.1 for h in prev_heads), res.scores
