"""Induction: repeated random tokens, ``[BOS] + R + R``.

The standard induction task (Elhage et al. 2021, "A Mathematical Framework for Transformer
Circuits"; Olsson et al. 2022): a 2-layer attention-only model trained on repeated random sequences
grows previous-token heads in layer 0 and induction heads in layer 1 (METHODS.md, section 7).

Layout of a clean row (``L = seq_len``, positions on the left)::

    0        1 .. L      L+1 .. 2L-1
    [BOS]    R[0..L-1]   R[0..L-2]        -> answer R[L-1] at answer_pos = 2L-1

The prompt stops one token before the end of the second copy, so the answer is the next repeated
token. The corrupt row keeps the first copy and replaces the second half by fresh tokens that do
not occur in ``R``, except its last token, which is ``R[j]`` for a random ``j < L-2``: the induction
answer of the corrupt row is ``R[j+1]`` (``corrupt_answer``), different from ``R[L-1]``.

Caveats: with ``distinct=True`` (the default) ``R`` has no repeated token and the fresh tokens are
disjoint from ``R``, which needs ``2 * seq_len`` usable ids; with ``distinct=False`` tokens are drawn
with replacement and the answers hold only for a model that copies the latest match. Training code
can rebuild the full ``[BOS] + R + R`` sequence as ``torch.cat([b.clean, b.answer[:, None]], 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from mechscope.errors import InputError
from mechscope.tasks._text import as_tokenizer, check_n
from mechscope.tasks.base import TaskBatch

__all__ = ["induction", "induction_pool"]


def induction_pool(
    *,
    d_vocab: int | None = None,
    vocab: Any = None,
    bos: int | None | Literal["auto"] = "auto",
) -> tuple[np.ndarray, int | None]:
    """The ids ``R`` is sampled from, and the BOS id (``None``: no BOS).

    Args:
        d_vocab: sample from ``range(d_vocab)``.
        vocab: a Hugging Face tokenizer (every id but its special tokens) or a sequence of ids.
        bos: the BOS id; ``"auto"`` means the tokenizer's ``bos_token_id`` for a tokenizer
            (``None`` if it has none) and ``0`` otherwise. The BOS id is never sampled.

    >>> pool, bos = induction_pool(d_vocab=8)
    >>> pool.tolist(), bos
    ([1, 2, 3, 4, 5, 6, 7], 0)
    """
    if (d_vocab is None) == (vocab is None):
        raise InputError("give exactly one of d_vocab=<int> or vocab=<tokenizer or list of ids>")
    if d_vocab is not None:
        if not isinstance(d_vocab, int) or d_vocab < 2:
            raise InputError(f"d_vocab must be an int >= 2, got {d_vocab!r}")
        ids = np.arange(d_vocab)
        auto_bos: int | None = 0
        exclude: set[int] = set()
    elif isinstance(vocab, Sequence) and not isinstance(vocab, str | bytes):
        ids = np.unique(np.asarray(list(vocab), dtype=np.int64))
        if ids.size == 0:
            raise InputError("vocab is an empty list of token ids; give at least 2 ids")
        auto_bos, exclude = 0, set()
    else:
        tok = as_tokenizer(vocab)
        ids = np.arange(len(tok))
        auto_bos = getattr(tok, "bos_token_id", None)
        exclude = {int(i) for i in getattr(tok, "all_special_ids", [])}
    bos_id = auto_bos if bos == "auto" else bos
    if bos_id is not None:
        exclude.add(int(bos_id))
    pool = ids[~np.isin(ids, list(exclude))] if exclude else ids
    return pool.astype(np.int64), (None if bos_id is None else int(bos_id))


def induction(
    n: int,
    *,
    seq_len: int,
    seed: int = 0,
    d_vocab: int | None = None,
    vocab: Any = None,
    bos: int | None | Literal["auto"] = "auto",
    distinct: bool = True,
) -> TaskBatch:
    """``n`` induction prompts ``[BOS] + R + R[:-1]`` with their fresh-second-half corruptions.

    Args:
        n: number of prompts.
        seq_len: length ``L`` of ``R`` (at least 3).
        seed: seed of a local generator; the same seed gives the same batch.
        d_vocab: sample ``R`` from ``range(d_vocab)`` (zoo models); or
        vocab: a tokenizer or a list of allowed ids (real vocabularies).
        bos: BOS id, ``None`` for none, ``"auto"`` (see :func:`induction_pool`).
        distinct: no repeated token in ``R`` and fresh tokens disjoint from ``R``.

    Returns:
        A :class:`TaskBatch` of shape ``[n, 2L]`` (``[n, 2L - 1]`` without BOS). ``meta`` holds
        ``seq_len``, ``bos``, ``first_start`` (position of ``R[0]``), ``repeat_start`` (position of
        the second copy) and ``corrupt_source`` (per row, the position ``j+1`` in the first copy
        whose token is the corrupt answer).

    >>> b = induction(2, seq_len=4, d_vocab=32, seed=0)
    >>> b.clean.shape, b.meta["repeat_start"]
    (torch.Size([2, 8]), 5)
    >>> bool((b.clean[:, 1:4] == b.clean[:, 5:8]).all()), bool((b.answer != b.corrupt_answer).all())
    (True, True)
    """
    check_n(n)
    if not isinstance(seq_len, int) or seq_len < 3:
        raise InputError(f"seq_len (the length of R) must be an int >= 3, got {seq_len!r}")
    pool, bos_id = induction_pool(d_vocab=d_vocab, vocab=vocab, bos=bos)
    need = 2 * seq_len - 2 if distinct else 2
    if pool.size < need:
        raise InputError(
            f"only {pool.size} usable token ids for seq_len={seq_len}; distinct=True needs "
            f"{need}: use a larger vocabulary, a shorter seq_len, or distinct=False"
        )
    rng = np.random.default_rng(seed)
    L = seq_len
    off = 0 if bos_id is None else 1
    clean = np.empty((n, off + 2 * L - 1), dtype=np.int64)
    corrupt = np.empty_like(clean)
    sources = rng.integers(0, L - 2, size=n)  # j in [0, L-3]
    for i in range(n):
        if distinct:
            draw = rng.choice(pool, size=2 * L - 2, replace=False)
            r, fresh = draw[:L], draw[L:]
        else:
            r, fresh = rng.choice(pool, size=L), rng.choice(pool, size=L - 2)
        clean[i, off:] = np.concatenate([r, r[:-1]])
        corrupt[i, off:] = np.concatenate([r, fresh, r[sources[i] : sources[i] + 1]])
    if bos_id is not None:
        clean[:, 0] = corrupt[:, 0] = bos_id
    answer = clean[:, off + L - 1]
    corrupt_answer = clean[np.arange(n), off + sources + 1]
    return TaskBatch(
        task="induction",
        clean=torch.from_numpy(clean),
        corrupt=torch.from_numpy(corrupt),
        answer=torch.from_numpy(answer.copy()),
        corrupt_answer=torch.from_numpy(corrupt_answer),
        answer_pos=torch.full((n,), clean.shape[1] - 1, dtype=torch.long),
        seed=seed,
        meta={
            "seq_len": L,
            "bos": bos_id,
            "first_start": off,
            "repeat_start": off + L,
            "corrupt_source": (off + sources + 1).tolist(),
            "distinct": distinct,
        },
    )
