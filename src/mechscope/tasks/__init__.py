"""Task generators: clean/corrupt token batches with answers and a metric.

Every generator returns a :class:`TaskBatch` (``mechscope.tasks.base``): clean and corrupt rows
of equal length, the answer each calls for, the position to score, and a metric. Generators are
deterministic under ``seed`` (local ``numpy``/``torch`` generators, never global seeding).

========================  ===========================================================
task                      generator
========================  ===========================================================
``induction``             :func:`induction`, ``[BOS] + R + R`` (zoo ids or a tokenizer)
``retrieval``             :func:`retrieval`, synthetic key-value needle in a haystack
``retrieval_text``        :func:`text_retrieval`, stdlib-docstring haystack + passcode
``facts``                 :func:`synthetic_facts` / :class:`FactWorld`
``facts_rome``            :func:`rome_facts` over :func:`load_rome_facts`
``ioi``                   :func:`ioi`, text IOI (ABBA/BABA; ABC or flip corruption)
``ioi_synthetic``         :func:`synthetic_ioi`, token-level IOI for zoo models
========================  ===========================================================

>>> sorted(TASKS)[:3]
['facts', 'facts_rome', 'induction']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mechscope.tasks.base import MetricKind, TaskBatch
from mechscope.tasks.facts import (
    Fact,
    FactWorld,
    RomeFact,
    filter_known,
    load_rome_facts,
    rome_facts,
)
from mechscope.tasks.induction import induction, induction_pool
from mechscope.tasks.ioi import (
    IOILists,
    IOIVocab,
    default_ioi_lists,
    ioi,
    load_ioi_lists,
    synthetic_ioi,
)
from mechscope.tasks.retrieval import (
    Needle,
    RetrievalVocab,
    retrieval,
    retrieval_grid,
    text_retrieval,
)


def synthetic_facts(
    n: int, *, seed: int = 0, world: FactWorld | None = None, subject_len: int | None = None
) -> TaskBatch:
    """``n`` facts from a :class:`FactWorld` (default ``FactWorld()``); see :meth:`FactWorld.batch`.

    >>> synthetic_facts(3, seed=1).clean.shape
    torch.Size([3, 4])
    """
    return (world or FactWorld()).batch(n, seed=seed, subject_len=subject_len)


#: Task name -> generator, for the command line.
TASKS: dict[str, Callable[..., Any]] = {
    "induction": induction,
    "retrieval": retrieval,
    "retrieval_text": text_retrieval,
    "facts": synthetic_facts,
    "facts_rome": rome_facts,
    "ioi": ioi,
    "ioi_synthetic": synthetic_ioi,
}

__all__ = [
    "TASKS",
    "Fact",
    "FactWorld",
    "IOILists",
    "IOIVocab",
    "MetricKind",
    "Needle",
    "RetrievalVocab",
    "RomeFact",
    "TaskBatch",
    "default_ioi_lists",
    "filter_known",
    "induction",
    "induction_pool",
    "ioi",
    "load_ioi_lists",
    "load_rome_facts",
    "retrieval",
    "retrieval_grid",
    "rome_facts",
    "synthetic_facts",
    "synthetic_ioi",
    "text_retrieval",
]
