"""Training streams and evaluation batches for the zoo tasks.

Training rows are ``(tokens [batch, pos], mask [batch, pos-1])``: the model is trained with
cross-entropy on the next token only where ``mask`` is true (the positions the intended mechanism
can predict). Evaluation uses the task generators of :mod:`mechscope.tasks` (induction, retrieval, facts,
synthetic IOI), so the zoo models speak the token layouts those generators define.

- induction: random tokens (ids 1..d_vocab-1, BOS 0) in which a segment of random length
  ``min_repeat..max_repeat`` appears twice at random places; loss on the second copy after its
  first token. Evaluated with :func:`mechscope.tasks.induction.induction` (``[BOS] R R``).
- retrieval: the :class:`~mechscope.tasks.retrieval.RetrievalVocab` layout. The first
  ``induction_frac`` of the steps are induction rows (random tokens with a repeated segment, 64
  tokens, ``induction_batch`` rows), which grow the previous-token + copy mechanism far faster than
  sparse key/value rows do (without them the loss sat near 2.9 for 1,400 steps). Then each batch
  has one context length, drawn uniformly from ``min_len..max_len``, and two kinds of
  rows: multi-query rows (:func:`multi_query_rows`: ``[BOS]`` random filler holding up to
  ``max_pairs`` ``key value`` pairs with distinct keys, then 2..``n_queries`` ``[QUERY] key
  value`` triples asking for present keys; loss on each queried value) and, a ``single_frac``
  share, rows laid out exactly as the evaluation's (:func:`single_query_rows`; one needle at a
  random depth, ends over-weighted). Evaluated with :func:`mechscope.tasks.retrieval.retrieval`
  at ``eval_len`` tokens and depths 0, 0.1, .., 1.
- facts: :class:`~mechscope.tasks.facts.FactWorld` rows ``[BOS] subject REL attribute``, right-padded
  with BOS; loss on the attribute only.
- ioi: the :class:`~mechscope.tasks.ioi.IOIVocab` template ``[BOS] WHEN A AND B WENT AT PLACE ,
  B GAVE OBJ TO`` -> ``A`` (ABBA and BABA, random names) with ``0..n_fill`` extra filler tokens
  spread over three slots during training, so no position fixes a role; evaluated on the plain
  template of :func:`~mechscope.tasks.ioi.synthetic_ioi`.

Caveat: evaluation samples are fresh (seeded apart from training) for induction, retrieval and
IOI; facts are memorised, so "fresh" means freshly sampled prompts from the same fixed world.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechscope.models.zoo.recipes import Recipe
from mechscope.tasks.base import TaskBatch
from mechscope.tasks.facts import FactWorld
from mechscope.tasks.induction import induction
from mechscope.tasks.ioi import IOIVocab, synthetic_ioi
from mechscope.tasks.retrieval import RetrievalVocab, retrieval

Batch = tuple[Tensor, Tensor]  # tokens [batch, pos], loss mask [batch, pos-1]


# --------------------------------------------------------------------------------------------
# induction


def induction_train(recipe: Recipe, rng: np.random.Generator, step: int) -> Batch:
    a = recipe.task_args
    return repeat_rows(rng, recipe.batch_size, a["seq_len"], recipe.d_vocab, a["min_repeat"],
                       a["max_repeat"])  # fmt: skip


def repeat_rows(
    rng: np.random.Generator, b: int, t: int, d_vocab: int, min_repeat: int, max_repeat: int
) -> Batch:
    """Random tokens (BOS 0) with one segment repeated at random places; loss on the copy."""
    tokens = rng.integers(1, d_vocab, size=(b, t))
    tokens[:, 0] = 0
    mask = np.zeros((b, t - 1), dtype=bool)
    for i in range(b):
        n = int(rng.integers(min_repeat, max_repeat + 1))
        s1 = int(rng.integers(1, t - 2 * n + 1))
        s2 = int(rng.integers(s1 + n, t - n + 1))
        tokens[i, s2 : s2 + n] = tokens[i, s1 : s1 + n]
        mask[i, s2 : s2 + n - 1] = True  # predict copy tokens 1..n-1 of the second copy
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def induction_eval(recipe: Recipe, n: int, seed: int) -> list[TaskBatch]:
    return [
        induction(n, seq_len=recipe.task_args["eval_repeat"], d_vocab=recipe.d_vocab, seed=seed)
    ]


def induction_patch(recipe: Recipe, n: int, seed: int) -> list[TaskBatch]:
    """Rows of :func:`~mechscope.tasks.induction.induction` whose corrupt row permutes the FIRST copy.

    The generator's own corruption changes the second half, which leaves the first copy, and so
    every previous-token head's output there, unchanged: patching could not see those heads.
    Here the corrupt row is ``[BOS] P(R) R[:-1]`` for a random permutation ``P``; the query token
    ``R[L-2]`` is then followed in the first copy by another token of ``R``, the corrupt answer.
    """
    b = induction(n, seq_len=recipe.task_args["eval_repeat"], d_vocab=recipe.d_vocab, seed=seed)
    rng = np.random.default_rng([seed, 1])
    L, off = b.meta["seq_len"], b.meta["first_start"]
    corrupt = b.clean.clone()
    cans = torch.empty_like(b.answer)
    for i in range(b.batch_size):
        first = b.clean[i, off : off + L]
        while True:
            perm = first[torch.from_numpy(rng.permutation(L))]
            where = int((perm == first[L - 2]).nonzero()[0, 0])
            if where < L - 1 and perm[where + 1] != first[L - 1]:
                break
        corrupt[i, off : off + L] = perm
        cans[i] = perm[where + 1]
    return [TaskBatch(task="induction", clean=b.clean, corrupt=corrupt, answer=b.answer,
                      corrupt_answer=cans, answer_pos=b.answer_pos, seed=seed,
                      meta={**b.meta, "corruption": "first copy permuted"})]  # fmt: skip


# --------------------------------------------------------------------------------------------
# retrieval


def retrieval_vocab(recipe: Recipe) -> RetrievalVocab:
    return RetrievalVocab() if recipe.d_vocab == 256 else RetrievalVocab.for_vocab(recipe.d_vocab)


def retrieval_train(recipe: Recipe, rng: np.random.Generator, step: int) -> Batch:
    a, v = recipe.task_args, retrieval_vocab(recipe)
    if step < a["induction_frac"] * recipe.steps:  # warm-up: grow the copy mechanism cheaply
        return repeat_rows(rng, a["induction_batch"], 64, recipe.d_vocab, 5, 30)
    t = int(rng.integers(a["min_len"], a["max_len"] + 1))
    n_single = int(round(a["single_frac"] * recipe.batch_size))
    multi_t, multi_m = multi_query_rows(rng, recipe.batch_size - n_single, t, v, a)
    if n_single == 0:
        return multi_t, multi_m
    single_t, single_m = single_query_rows(rng, n_single, t, v, a)
    return torch.cat([multi_t, single_t]), torch.cat([multi_m, single_m])


def multi_query_rows(
    rng: np.random.Generator, b: int, t: int, v: RetrievalVocab, a: dict[str, Any]
) -> Batch:
    """Filler with up to ``max_pairs`` pairs, then 2..``n_queries`` ``[QUERY] key value`` triples."""
    keys, values, filler = (np.asarray(r) for r in (v.keys, v.values, v.filler))
    tokens = rng.choice(filler, size=(b, t))
    tokens[:, 0] = v.bos
    mask = np.zeros((b, t - 1), dtype=bool)
    for i in range(b):
        nq = int(rng.integers(2, max(2, min(a["n_queries"], (t - 1) // 8)) + 1))
        hay = t - 1 - 3 * nq  # haystack positions 1 .. hay
        n_pairs = int(rng.integers(nq, max(nq, min(a["max_pairs"], hay // 3)) + 1))
        # non-overlapping pair slots: choose n_pairs offsets on a shrunken line, then stretch
        offs = np.sort(rng.choice(hay - 2 * n_pairs + 1, size=n_pairs, replace=False))
        starts = 1 + offs + 2 * np.arange(n_pairs)
        ks = rng.choice(keys, size=n_pairs, replace=False)
        vs = rng.choice(values, size=n_pairs)
        tokens[i, starts], tokens[i, starts + 1] = ks, vs
        asked = rng.choice(n_pairs, size=nq, replace=False)
        tokens[i, 1 + hay :] = rng.choice(filler, size=t - 1 - hay)
        for q, j in enumerate(asked):
            p = t - 3 * nq + 3 * q
            tokens[i, p : p + 3] = (v.query, ks[j], vs[j])
            mask[i, p + 1] = True  # at the key, predict its value
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def single_query_rows(
    rng: np.random.Generator, b: int, t: int, v: RetrievalVocab, a: dict[str, Any]
) -> Batch:
    """Rows laid out exactly as :func:`~mechscope.tasks.retrieval.retrieval` lays them out (one
    needle, ``0..max_distractors`` distractors, ``[QUERY] key`` at the end). Depth 0 with
    probability ``p_first``, depth 1 with ``p_last``, else uniform in [0, 1]: a needle right after
    BOS or right before the query is a place multi-query rows rarely put a queried pair."""
    rows = []
    for _ in range(b):
        u = rng.random()
        if u < a["p_first"]:
            depth = 0.0
        elif u < a["p_first"] + a["p_last"]:
            depth = 1.0
        else:
            depth = float(rng.random())
        nd = int(rng.integers(0, min(a["max_distractors"], (t - 4) // 2 - 2) + 1))
        batch = retrieval(1, context_len=t - 1, depth=depth, seed=int(rng.integers(2**31)),
                          vocab=v, n_distractors=nd)  # fmt: skip
        rows.append(torch.cat([batch.clean[0], batch.answer]))  # prompt + answer: t tokens
    tokens = torch.stack(rows)
    mask = torch.zeros(b, t - 1, dtype=torch.bool)
    mask[:, -1] = True  # at the query key, predict the needle's value
    return tokens, mask


def retrieval_eval(recipe: Recipe, n: int, seed: int) -> list[TaskBatch]:
    """One batch per depth 0, 0.1, .., 1 (``n`` rows in all), at ``eval_len`` tokens."""
    depths = np.linspace(0.0, 1.0, 11)
    per = max(1, n // len(depths))
    return [
        retrieval(per, context_len=recipe.task_args["eval_len"], depth=float(d), seed=seed + k,
                  vocab=retrieval_vocab(recipe), n_ctx=recipe.n_ctx)
        for k, d in enumerate(depths)
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# facts


def fact_world(recipe: Recipe) -> FactWorld:
    a = recipe.task_args
    return FactWorld(n_subjects=a["n_subjects"], subject_len=tuple(a["subject_len"]),
                     n_relations=a["n_relations"], n_attributes=a["n_attributes"],
                     d_vocab=recipe.d_vocab, seed=a["world_seed"])  # fmt: skip


@lru_cache(maxsize=8)
def _fact_rows(world: FactWorld) -> tuple[np.ndarray, np.ndarray]:
    seqs = world.sequences()
    width = max(len(s) for s in seqs)
    rows = np.full((len(seqs), width), world.bos, dtype=np.int64)
    answer_at = np.empty(len(seqs), dtype=np.int64)
    for i, s in enumerate(seqs):
        rows[i, : len(s)] = s
        answer_at[i] = len(s) - 2  # the relation position predicts the attribute
    return rows, answer_at


def facts_train(recipe: Recipe, rng: np.random.Generator, step: int) -> Batch:
    rows, answer_at = _fact_rows(fact_world(recipe))
    pick = rng.integers(0, len(rows), size=recipe.batch_size)
    tokens = rows[pick]
    mask = np.zeros((len(pick), tokens.shape[1] - 1), dtype=bool)
    mask[np.arange(len(pick)), answer_at[pick]] = True
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def facts_eval(recipe: Recipe, n: int, seed: int) -> list[TaskBatch]:
    world = fact_world(recipe)
    lo, hi = world.len_range
    lens = range(lo, hi + 1)
    return [world.batch(max(2, n // len(lens)), seed=seed + k, subject_len=k) for k in lens]


# --------------------------------------------------------------------------------------------
# ioi


def ioi_train(recipe: Recipe, rng: np.random.Generator, step: int) -> Batch:
    """IOIVocab rows with ``0..n_fill`` filler tokens spread over three slots (one count per batch)."""
    v = IOIVocab(n_names=recipe.task_args["n_names"])
    b = synthetic_ioi(recipe.batch_size, seed=int(rng.integers(2**31)), vocab=v)
    rows = torch.cat([b.clean, b.answer[:, None]], dim=1).numpy()  # 13 prompt tokens + answer
    k = int(rng.integers(0, recipe.task_args["n_fill"] + 1))
    out = np.empty((rows.shape[0], rows.shape[1] + k), dtype=np.int64)
    filler = np.asarray(v.filler)
    for i, row in enumerate(rows):
        cut = np.sort(rng.integers(0, k + 1, size=2))
        f = rng.choice(filler, size=k)
        # slots: after WHEN (pos 1), after COMMA (pos 8), after OBJ (pos 11)
        out[i] = np.concatenate([row[:2], f[: cut[0]], row[2:9], f[cut[0] : cut[1]], row[9:12],
                                 f[cut[1] :], row[12:]])  # fmt: skip
    tokens = torch.from_numpy(out)
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    mask[:, -1] = True
    return tokens, mask


def ioi_eval(recipe: Recipe, n: int, seed: int) -> list[TaskBatch]:
    """:func:`~mechscope.tasks.ioi.synthetic_ioi` rows (the fixed 13-token template, flip corruption)."""
    return [synthetic_ioi(n, seed=seed, vocab=IOIVocab(n_names=recipe.task_args["n_names"]))]


# --------------------------------------------------------------------------------------------

TRAIN_STREAMS: dict[str, Any] = {
    "induction": induction_train,
    "retrieval": retrieval_train,
    "facts": facts_train,
    "ioi": ioi_train,
}
#: What the corrupt row of each task's patching batch changes (stored with the patching table).
PATCH_CORRUPTION: dict[str, str] = {
    "induction": "the first copy of R is permuted, so the query token is followed by another token",
    "retrieval": "the needle's value is replaced (tasks.retrieval); keys and query are unchanged",
    "facts": "another subject of the same length whose attribute differs (FactWorld.batch)",
    "ioi": "flip: S2 is replaced by the IO name, so the answer becomes S (tasks.synthetic_ioi)",
}

#: Batches for the activation-patching table (the evaluation batches unless a task needs its own).
PATCH_BATCHES: dict[str, Any] = {
    "induction": induction_patch,
    "retrieval": retrieval_eval,
    "facts": facts_eval,
    "ioi": ioi_eval,
}
EVAL_BATCHES: dict[str, Any] = {
    "induction": induction_eval,
    "retrieval": retrieval_eval,
    "facts": facts_eval,
    "ioi": ioi_eval,
}
