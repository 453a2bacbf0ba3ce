"""The shipped ROME known facts (``mechscope.data``)."""

from __future__ import annotations

import pytest

from mechscope.data import known_facts, known_ids
from mechscope.errors import InputError


def test_smollm2_ids_are_279_known_facts():
    ids = known_ids("smollm2")
    every = known_facts(None)
    assert len(every) == 1209 and len({f["known_id"] for f in every}) == 1209
    assert len(ids) == 279 and len(set(ids)) == 279
    assert set(ids) <= {f["known_id"] for f in every}
    facts = known_facts("smollm2")
    assert [f["known_id"] for f in facts] == sorted(ids, key=[f["known_id"] for f in every].index)
    assert all(f["subject"] in f["prompt"] for f in facts)


def test_unknown_model_is_an_input_error():
    with pytest.raises(InputError, match="no known-facts list"):
        known_facts("gpt2")
