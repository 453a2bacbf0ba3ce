"""Tokenizer helpers and the offline haystack corpus shared by the text tasks.

The haystack text is the docstrings of a fixed, sorted list of Python standard-library modules
(module docstrings, then the docstrings of their public functions and classes, in sorted order),
collected with :func:`inspect.getdoc`. It is available offline on every machine and carries no
third-party copyright. Caveat: docstrings change a little between Python versions, so a haystack
is reproducible across machines with the same Python minor version, and nearly so otherwise.

Tokenizers are Hugging Face tokenizers (``model.tokenizer`` of a ``TransformerBridge`` or
``transformers.AutoTokenizer``); a model that carries a ``.tokenizer`` is accepted too.
"""

from __future__ import annotations

import importlib
import inspect
import weakref
from functools import lru_cache
from typing import Any

import numpy as np

from mechscope.errors import InputError
from mechscope.tasks.base import pad_id, right_pad

__all__ = ["as_tokenizer", "bos_prefix", "check_n", "encode", "pad_id", "right_pad",
           "single_token", "stdlib_corpus", "corpus_tokens", "haystack"]

#: The standard-library modules whose docstrings make the haystack (sorted, platform-neutral).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fractions", "functools", "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools",
    "json", "logging", "math", "operator", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "shlex", "statistics", "string", "struct", "textwrap", "threading", "timeit",
    "tokenize", "types", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "zipfile", "zlib",
)  # fmt: skip


def as_tokenizer(obj: Any) -> Any:
    """Return a usable Hugging Face tokenizer, or raise :class:`InputError`.

    Accepts a tokenizer or any object with a non-``None`` ``.tokenizer`` attribute (a bridge).

    >>> as_tokenizer("gpt2")
    Traceback (most recent call last):
    ...
    mechscope.errors.InputError: 'gpt2' is a str, not a tokenizer; pass a loaded tokenizer ...
    """
    tok = getattr(obj, "tokenizer", None) if not hasattr(obj, "convert_ids_to_tokens") else obj
    if tok is None or isinstance(obj, str | bytes) or not callable(getattr(tok, "encode", None)):
        raise InputError(
            f"{obj!r:.60} is a {type(obj).__name__}, not a tokenizer; pass a loaded tokenizer "
            "(model.tokenizer, or transformers.AutoTokenizer.from_pretrained(path))"
        )
    return tok


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]


def bos_prefix(tok: Any, prepend_bos: bool) -> list[int]:
    """``[tok.bos_token_id]`` when asked for and the tokenizer has one, else ``[]``."""
    bos = getattr(tok, "bos_token_id", None)
    return [int(bos)] if prepend_bos and bos is not None else []


def single_token(tok: Any, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token, else ``None``."""
    ids = encode(tok, text)
    return ids[0] if len(ids) == 1 else None


def check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n (the number of prompts) must be a positive int, got {n!r}")


@lru_cache(maxsize=1)
def stdlib_corpus() -> tuple[str, ...]:
    """Paragraphs of standard-library docstrings, in a fixed order.

    >>> paragraphs = stdlib_corpus()
    >>> len(paragraphs) > 1000 and all(p.strip() for p in paragraphs)
    True
    """
    paragraphs: list[str] = []
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        members = getattr(mod, "__all__", None) or [m for m in dir(mod) if not m.startswith("_")]
        for member in sorted(members):
            obj = getattr(mod, member, None)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            paragraphs.extend(p.strip() for p in doc.split("\n\n") if p.strip())
    return tuple(paragraphs)


_CORPUS_CACHE: dict[int, tuple[weakref.ref[Any] | None, np.ndarray, np.ndarray]] = {}


def corpus_tokens(tok: Any) -> tuple[np.ndarray, np.ndarray]:
    """The haystack corpus as one token stream, and the positions where a sentence starts.

    Paragraphs are tokenized one by one and joined with the tokens of ``"\\n\\n"``. A position is a
    sentence start when it opens a paragraph or follows a token ending in ``.``, ``!``, ``?`` or a
    newline (found with the fast tokenizer's offsets; paragraph starts only for slow tokenizers).
    Cached per tokenizer object.
    """
    key = id(tok)
    hit = _CORPUS_CACHE.get(key)
    if hit is not None and (hit[0] is None or hit[0]() is tok):
        return hit[1], hit[2]
    paragraphs = list(stdlib_corpus())
    sep = encode(tok, "\n\n")
    fast = bool(getattr(tok, "is_fast", False))
    enc = tok(paragraphs, add_special_tokens=False, return_offsets_mapping=fast)
    ids: list[int] = []
    starts: list[int] = []
    for k, (para, row) in enumerate(zip(paragraphs, enc["input_ids"], strict=True)):
        if k:
            ids.extend(sep)
        base = len(ids)
        starts.append(base)
        if fast:
            for j, (_, end) in enumerate(enc["offset_mapping"][k][:-1]):
                if end and para[end - 1] in ".!?\n":
                    starts.append(base + j + 1)
        ids.extend(int(i) for i in row)
    try:
        ref: weakref.ref[Any] | None = weakref.ref(tok)
    except TypeError:
        ref = None
    out = (np.asarray(ids, dtype=np.int64), np.unique(np.asarray(starts, dtype=np.int64)))
    _CORPUS_CACHE[key] = (ref, *out)
    return out


def haystack(tok: Any, length: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """``length`` corpus tokens from a random sentence start (wrapping around), and the offsets
    inside that window where sentences start."""
    ids, starts = corpus_tokens(tok)
    if length <= 0:
        return [], [0]
    start = int(starts[rng.integers(len(starts))])
    idx = (start + np.arange(length)) % len(ids)
    is_start = np.isin(idx, starts)
    return ids[idx].tolist(), np.flatnonzero(is_start).tolist()
