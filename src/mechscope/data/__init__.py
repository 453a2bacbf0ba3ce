"""Data shipped with mechscope: ROME's known facts (``known_1000.json``).

- ``known_1000.json``: the 1,209 "known facts" of Meng et al. 2022 ("Locating and Editing Factual
  Associations in GPT"; github.com/kmeng01/rome, MIT licence in ``LICENSE.rome.txt``), unchanged.
  Their selection and ``prediction`` field are GPT-2 XL's.
- ``smollm2_known_ids.json``: the 279 ``known_id`` s whose attribute SmolLM2-135M-Instruct predicts
  top-1 (its first token, greedy) after the prompt.

``SOURCE.txt`` says where each file comes from.

>>> facts = known_facts()
>>> len(facts), facts[0]["subject"] in facts[0]["prompt"]
(279, True)
>>> len(known_facts(None))
1209
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from mechscope.errors import InputError

__all__ = ["KNOWN_IDS", "known_facts", "known_ids"]

#: Models with a shipped list of the facts they know: name -> file in this package.
KNOWN_IDS = {"smollm2": "smollm2_known_ids.json"}


@lru_cache(maxsize=4)
def _read(name: str) -> Any:
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def known_ids(model: str = "smollm2") -> list[int]:
    """The ``known_id`` s of the facts ``model`` predicts top-1 (see :data:`KNOWN_IDS`).

    Raises:
        InputError: no list is shipped for ``model``.
    """
    if model not in KNOWN_IDS:
        raise InputError(f"no known-facts list for {model!r}; shipped: {sorted(KNOWN_IDS)} "
                         "(or pass None for all 1,209 facts)")  # fmt: skip
    return [int(i) for i in _read(KNOWN_IDS[model])]


def known_facts(model_known_ids: str | None = "smollm2") -> list[dict[str, Any]]:
    """ROME's known facts as dicts (``known_id``, ``subject``, ``attribute``, ``template``,
    ``prediction``, ``prompt``, ``relation_id``), in file order.

    Args:
        model_known_ids: keep only the facts this model knows (a key of :data:`KNOWN_IDS`);
            None: all 1,209 facts.

    Raises:
        InputError: no list is shipped for ``model_known_ids``.
    """
    facts = [dict(f) for f in _read("known_1000.json")]
    if model_known_ids is None:
        return facts
    keep = set(known_ids(model_known_ids))
    return [f for f in facts if int(f["known_id"]) in keep]
