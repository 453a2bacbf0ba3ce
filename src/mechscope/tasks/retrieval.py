"""Retrieval: a needle (key -> value) in a haystack, then a query whose answer is the value.

After the needle-in-a-haystack test used to find retrieval heads (Wu et al. 2024,
nightdessert/Retrieval_Head; METHODS.md sections 3 and 7). Two flavours:

- :func:`retrieval`, synthetic tokens for zoo models, with the vocabulary layout of
  :class:`RetrievalVocab`. A row is ``[BOS] haystack [QUERY] key`` and the answer is the value that
  followed ``key`` in the haystack. The haystack is random filler with ``n_distractors`` other
  ``key value`` pairs (distinct keys) and the needle pair at the requested depth.
- :func:`text_retrieval`, text for real tokenizers: standard-library docstrings as haystack
  (see :mod:`mechscope.tasks._text`), a needle ``"The secret passcode of <city> is <number>."``
  and a question at the end. The context length is measured in tokens.

In both, the corrupt row changes only the needle's value, so the answer changes and the length
does not. Depth ``d`` puts the needle's first token at haystack offset ``round(d * (H - len(needle)))``
(``H`` = haystack length); the text flavour then moves it back to the nearest sentence start
within ``snap`` tokens. ``meta["needle_start"]`` gives the real positions.

Caveat (text): numbers tokenize differently across tokenizers (SmolLM2 splits digits and writes the
leading space as its own token). The answer is the first token where the clean and corrupt values
differ, which is chosen to be the first token after the prefix every value shares (the lone
space); that prefix ends the prompt, so the model is asked for the next token exactly as the
needle spelled it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechscope.errors import InputError
from mechscope.tasks._text import as_tokenizer, bos_prefix, check_n, encode, haystack
from mechscope.tasks.base import TaskBatch

__all__ = [
    "CITIES",
    "Needle",
    "RetrievalVocab",
    "retrieval",
    "retrieval_grid",
    "text_retrieval",
]


@dataclass(frozen=True, kw_only=True)
class RetrievalVocab:
    """Token layout of the synthetic retrieval task (defaults fit ``d_vocab=256``).

    ========  ======================  ==========================
    id        role                    default
    ========  ======================  ==========================
    bos       start of sequence       0
    query     query marker            1
    keys      ``key_start`` + n_keys  2 .. 65 (64 keys)
    values    value_start + n_values  66 .. 129 (64 values)
    filler    filler_start + n_filler 130 .. 255 (126 fillers)
    ========  ======================  ==========================

    >>> v = RetrievalVocab()
    >>> v.keys.stop == v.value_start, v.filler.stop == v.d_vocab
    (True, True)
    """

    d_vocab: int = 256
    bos: int = 0
    query: int = 1
    key_start: int = 2
    n_keys: int = 64
    value_start: int = 66
    n_values: int = 64
    filler_start: int = 130
    n_filler: int = 126

    def __post_init__(self) -> None:
        ranges = sorted(
            [(self.bos, self.bos + 1), (self.query, self.query + 1), (self.key_start,
             self.key_start + self.n_keys), (self.value_start, self.value_start + self.n_values),
             (self.filler_start, self.filler_start + self.n_filler)]
        )  # fmt: skip
        if min(self.n_keys, self.n_values, self.n_filler) < 2:
            raise InputError("RetrievalVocab needs at least 2 keys, 2 values and 2 fillers")
        if ranges[0][0] < 0 or ranges[-1][1] > self.d_vocab:
            raise InputError(f"RetrievalVocab ranges must lie inside [0, d_vocab={self.d_vocab})")
        if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:], strict=False)):
            raise InputError(f"RetrievalVocab ranges overlap: {ranges}")

    @property
    def keys(self) -> range:
        return range(self.key_start, self.key_start + self.n_keys)

    @property
    def values(self) -> range:
        return range(self.value_start, self.value_start + self.n_values)

    @property
    def filler(self) -> range:
        return range(self.filler_start, self.filler_start + self.n_filler)

    @classmethod
    def for_vocab(cls, d_vocab: int) -> RetrievalVocab:
        """A layout filling ``d_vocab`` ids: a quarter keys, a quarter values, the rest filler.

        >>> RetrievalVocab.for_vocab(64).keys
        range(2, 17)
        """
        q = (d_vocab - 2) // 4
        return cls(d_vocab=d_vocab, key_start=2, n_keys=q, value_start=2 + q, n_values=q,
                   filler_start=2 + 2 * q, n_filler=d_vocab - 2 - 2 * q)  # fmt: skip


def _check_depth(depth: float) -> float:
    if not isinstance(depth, int | float) or not 0.0 <= float(depth) <= 1.0:
        raise InputError(f"depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    return float(depth)


def _check_len(context_len: int, needed: int, n_ctx: int | None, what: str) -> None:
    if not isinstance(context_len, int) or isinstance(context_len, bool):
        raise InputError(f"context_len must be an int number of tokens, got {context_len!r}")
    if n_ctx is not None and context_len > n_ctx:
        raise InputError(
            f"context_len={context_len} is longer than the model allows (n_ctx={n_ctx}); "
            "use a shorter context"
        )
    if context_len < needed:
        raise InputError(
            f"context_len={context_len} is too short: {what} alone take {needed} tokens; "
            "use a longer context or a shorter needle"
        )


def retrieval(
    n: int,
    *,
    context_len: int = 256,
    depth: float = 0.5,
    seed: int = 0,
    vocab: RetrievalVocab | None = None,
    n_distractors: int = 8,
    n_ctx: int | None = None,
) -> TaskBatch:
    """Synthetic key-value retrieval: ``[BOS] haystack [QUERY] key -> value``.

    Args:
        n: number of prompts.
        context_len: total tokens per row (BOS and query included); any length >= the needle,
            distractors and query fit (256 and far more are fine).
        depth: needle position in the haystack, 0 = first, 1 = last.
        seed: seed of a local generator.
        vocab: the token layout (default :class:`RetrievalVocab`).
        n_distractors: other ``key value`` pairs, at random places, keys distinct from the needle's.
        n_ctx: the model's context; a longer ``context_len`` is an error.

    Returns:
        A :class:`TaskBatch`; ``meta`` holds ``context_len``, ``depth``, ``needle_start`` (position
        of the needle key, per row), ``key``, ``value`` and ``corrupt_value`` per row.

    >>> b = retrieval(2, context_len=32, depth=0.0, seed=0, n_distractors=2)
    >>> b.clean.shape, b.meta["needle_start"]
    (torch.Size([2, 32]), [1, 1])
    >>> bool((b.clean[:, 2] == b.answer).all() and (b.corrupt[:, 2] == b.corrupt_answer).all())
    True
    """
    check_n(n)
    v = vocab or RetrievalVocab()
    depth = _check_depth(depth)
    if n_distractors < 0 or n_distractors + 1 > v.n_keys:
        raise InputError(f"n_distractors must be in [0, {v.n_keys - 1}] for {v.n_keys} keys")
    _check_len(context_len, 3 + 2 * (n_distractors + 1), n_ctx, "BOS, query and the key pairs")
    rng = np.random.default_rng(seed)
    L, H = context_len, context_len - 3  # haystack = positions 1 .. L-3
    clean = np.empty((n, L), dtype=np.int64)
    corrupt = np.empty_like(clean)
    starts, keys, values, cvalues = [], [], [], []
    for i in range(n):
        row = rng.choice(np.asarray(v.filler), size=L)
        row[0], row[L - 2] = v.bos, v.query
        start = 1 + round(depth * (H - 2))
        ks = rng.choice(np.asarray(v.keys), size=n_distractors + 1, replace=False)
        vals = rng.choice(np.asarray(v.values), size=n_distractors + 1)
        cval = rng.choice(np.setdiff1d(np.asarray(v.values), vals[:1]))
        # distractor slots: pair starts in the haystack that do not touch the needle pair
        slots = [s for s in range(1, L - 3) if abs(s - start) >= 2]
        picked: list[int] = []
        for s in rng.permutation(slots):
            if len(picked) == n_distractors:
                break
            if all(abs(int(s) - p) >= 2 for p in picked):
                picked.append(int(s))
        if len(picked) < n_distractors:
            raise InputError(f"context_len={L} has no room for {n_distractors} distractor pairs")
        for s, k, val in zip([start, *picked], ks, vals, strict=True):
            row[s], row[s + 1] = k, val
        row[L - 1] = ks[0]
        clean[i], corrupt[i] = row, row
        corrupt[i, start + 1] = cval
        starts.append(start)
        keys.append(int(ks[0]))
        values.append(int(vals[0]))
        cvalues.append(int(cval))
    return TaskBatch(
        task="retrieval",
        clean=torch.from_numpy(clean),
        corrupt=torch.from_numpy(corrupt),
        answer=torch.tensor(values),
        corrupt_answer=torch.tensor(cvalues),
        answer_pos=torch.full((n,), L - 1, dtype=torch.long),
        seed=seed,
        meta={"context_len": L, "depth": depth, "needle_start": starts, "needle_len": 2,
              "key": keys, "value": values, "corrupt_value": cvalues},
    )  # fmt: skip


#: City names for the text needles (keys); mechscope's own list.
CITIES: tuple[str, ...] = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin",
    "Oslo", "Tokyo", "Cairo", "Lima", "Seoul", "Sydney", "Toronto", "Boston", "Chicago",
    "Denver", "Mumbai", "Athens", "Warsaw", "Moscow", "Istanbul",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Needle:
    """The text needle and the question that asks for it.

    ``text`` and ``question`` are formatted with ``key``; ``text`` holds one ``{value}`` and the
    question ends where the value should follow. Values are integers in ``[low, high)``.
    """

    text: str = " The secret passcode of {key} is {value}."
    question: str = "\n\nQuestion: What is the secret passcode of {key}?\nAnswer: The secret passcode of {key} is"
    keys: tuple[str, ...] = CITIES
    low: int = 1000
    high: int = 10000


def _values(
    tok: Any, needle: Needle, rng: np.random.Generator
) -> tuple[int, int, list[int], list[int], int]:
    """A clean and a corrupt value of equal token length, and the index ``k`` of their first
    differing token. ``k`` is the length of the prefix every value shares (SmolLM2's lone space
    token; 0 for most tokenizers), so the prompt never gives away a digit."""
    lo, hi = encode(tok, f" {needle.low}"), encode(tok, f" {needle.high - 1}")
    k = next((j for j, (x, y) in enumerate(zip(lo, hi, strict=False)) if x != y), 0)
    for _ in range(500):
        a, b = (int(x) for x in rng.integers(needle.low, needle.high, size=2))
        ia, ib = encode(tok, f" {a}"), encode(tok, f" {b}")
        if len(ia) == len(ib) > k and ia[:k] == ib[:k] and ia[k] != ib[k]:
            return a, b, ia, ib, k
    raise InputError(
        f"no two values in [{needle.low}, {needle.high}) tokenize to equal lengths with different "
        "first tokens; widen the Needle value range"
    )


def text_retrieval(
    tokenizer: Any,
    n: int,
    *,
    context_len: int = 512,
    depth: float = 0.5,
    seed: int = 0,
    needle: Needle | None = None,
    n_ctx: int | None = None,
    prepend_bos: bool = True,
    snap: int = 32,
) -> TaskBatch:
    """Text needle-in-a-haystack for a Hugging Face tokenizer; ``context_len`` counts tokens.

    A row is ``[BOS] haystack[:s] needle haystack[s:] question value[:k]`` with exactly
    ``context_len`` tokens; the answer is ``value[k]``, the first token where the clean and corrupt
    values differ (``k`` = the prefix all values share: 0, or 1 for SmolLM2's lone space token).
    Haystacks are standard-library docstrings starting at a random sentence.

    Args:
        tokenizer: a tokenizer (or a model with ``.tokenizer``).
        n: number of prompts.
        context_len: tokens per row.
        depth: needle position in the haystack, in [0, 1].
        seed: seed of a local generator.
        needle: the needle text, question and value range (default :class:`Needle`).
        n_ctx: the model's context; a longer ``context_len`` is an error.
        prepend_bos: prepend ``tokenizer.bos_token_id`` when it has one.
        snap: move the needle back to a sentence start at most this many tokens earlier (0: off).

    Returns:
        A :class:`TaskBatch`; ``meta`` holds, per row, ``needle_start``/``needle_end`` (token
        span of the needle), ``value_start`` (position of the value's first token), ``key``,
        ``value``, ``corrupt_value``, ``haystack_len`` (``H``), and ``context_len``, ``depth``.
    """
    tok = as_tokenizer(tokenizer)
    check_n(n)
    depth = _check_depth(depth)
    nd = needle or Needle()
    if nd.text.count("{value}") != 1:
        raise InputError(f"Needle.text must hold exactly one '{{value}}', got {nd.text!r}")
    pre, post = nd.text.split("{value}")
    pre = pre.rstrip(" ")  # values are encoded with their leading space: " 4821"
    rng = np.random.default_rng(seed)
    bos = bos_prefix(tok, prepend_bos)
    clean_rows, corrupt_rows, ans, cans, meta_rows = [], [], [], [], []
    for _ in range(n):
        key = nd.keys[int(rng.integers(len(nd.keys)))]
        a, b, ia, ib, k = _values(tok, nd, rng)
        head, tail = encode(tok, pre.format(key=key)), encode(tok, post.format(key=key))
        question = encode(tok, nd.question.format(key=key)) + ia[:k]
        nlen = len(head) + len(ia) + len(tail)
        fixed = len(bos) + nlen + len(question)
        _check_len(context_len, fixed, n_ctx, "BOS, needle and question")
        H = context_len - fixed
        hay, sent = haystack(tok, H, rng)
        s = round(depth * H)
        if snap:
            near = [x for x in sent if s - snap <= x <= s]
            s = max(near) if near else s
        start = len(bos) + s
        row = bos + hay[:s] + head + ia + tail + hay[s:] + question
        crow = bos + hay[:s] + head + ib + tail + hay[s:] + question
        clean_rows.append(row)
        corrupt_rows.append(crow)
        ans.append(ia[k])
        cans.append(ib[k])
        meta_rows.append((start, start + nlen, start + len(head), key, a, b, H))
    cols = list(zip(*meta_rows, strict=True))
    return TaskBatch(
        task="retrieval_text",
        clean=torch.tensor(clean_rows),
        corrupt=torch.tensor(corrupt_rows),
        answer=torch.tensor(ans),
        corrupt_answer=torch.tensor(cans),
        answer_pos=torch.full((n,), context_len - 1, dtype=torch.long),
        seed=seed,
        meta={"context_len": context_len, "depth": depth, "needle_start": list(cols[0]),
              "needle_end": list(cols[1]), "value_start": list(cols[2]), "key": list(cols[3]),
              "value": list(cols[4]), "corrupt_value": list(cols[5]),
              "haystack_len": list(cols[6])},
    )  # fmt: skip


def retrieval_grid(
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    n: int = 1,
    seed: int = 0,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Iterator[TaskBatch]:
    """One batch per ``(length, depth)``, lengths outer, depths inner (Retrieval_Head's grid).

    Every cell uses the same ``seed`` (common random numbers). With ``tokenizer`` the cells come
    from :func:`text_retrieval`, else from :func:`retrieval`; ``kwargs`` go to the generator.
    Each batch's ``meta`` has ``context_len`` and ``depth``.

    >>> cells = list(retrieval_grid([32, 64], [0.0, 0.5, 1.0], n_distractors=2))
    >>> [(b.seq_len, b.meta["depth"]) for b in cells][:2]
    [(32, 0.0), (32, 0.5)]
    """
    if not lengths or not depths:
        raise InputError("retrieval_grid needs at least one length and one depth")
    for d in depths:
        _check_depth(d)
    for length in lengths:
        for d in depths:
            if tokenizer is None:
                yield retrieval(n, context_len=length, depth=d, seed=seed, **kwargs)
            else:
                yield text_retrieval(tokenizer, n, context_len=length, depth=d, seed=seed, **kwargs)
