"""Indirect object identification (IOI): "When Mary and John went to the store, John gave a drink
to" -> " Mary".

After Wang et al. 2022 ("Interpretability in the Wild") and the ACDC dataset code (Conmy et al.
2023, ArthurConmy/Automatic-Circuit-Discovery ``acdc/ioi/ioi_dataset.py``). Templates use ``[A]``
for the indirect object (IO, said once), ``[B]`` for the subject (S, said twice), ``[PLACE]`` and
``[OBJECT]``; a template ends with ``" [A]"``, which is cut off (it is the answer). ABBA templates
name IO first, BABA templates name S first. The metric is ``logit(IO) - logit(S)``:
``answer`` = IO, ``corrupt_answer`` = S.

Corruptions (same length, names are single tokens):

- ``"abc"`` (the IOI/ACDC standard): the three name slots get three new distinct names, so the
  answer is no longer determined.
- ``"flip"``: the second S is replaced by IO ("..., Mary gave a drink to"), so the answer becomes S.

Flavours: :func:`ioi` for a Hugging Face tokenizer with mechscope's own lists (or the ACDC lists via
:func:`load_ioi_lists`); :func:`synthetic_ioi` for zoo models with the token layout of
:class:`IOIVocab`. Caveat: names are encoded with a leading space (``" Mary"``) and names that are
not one token for the tokenizer are dropped; text rows are right-padded to equal width.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from mechscope.errors import InputError
from mechscope.tasks._text import (
    as_tokenizer,
    bos_prefix,
    check_n,
    encode,
    pad_id,
    right_pad,
    single_token,
)
from mechscope.tasks.base import TaskBatch

__all__ = ["IOILists", "IOIVocab", "default_ioi_lists", "ioi", "load_ioi_lists", "synthetic_ioi"]

Pattern = Literal["ABBA", "BABA", "mixed"]
Corruption = Literal["abc", "flip"]

_ABBA = (
    "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After [A] and [B] arrived at the [PLACE], [B] handed a [OBJECT] to [A]",
    "While [A] and [B] were at the [PLACE], [B] passed a [OBJECT] to [A]",
    "Once [A] and [B] reached the [PLACE], [B] offered a [OBJECT] to [A]",
)
_NAMES = (
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Anna", "Sarah", "David", "Paul", "Kate",
    "Emma", "Mark", "Lisa", "Peter", "Laura", "Daniel", "Susan", "Michael", "Linda", "Jack", "Sam",
)  # fmt: skip
_PLACES = ("store", "park", "school", "office", "beach", "market", "garden", "station")
_OBJECTS = ("drink", "book", "ball", "gift", "letter", "key", "pen", "flower")


@dataclass(frozen=True, kw_only=True)
class IOILists:
    """Names, templates and fillers of the text IOI task."""

    names: tuple[str, ...]
    abba: tuple[str, ...]
    baba: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]


def _to_baba(template: str) -> str:
    return template.replace("[A] and [B]", "[B] and [A]", 1)


def default_ioi_lists() -> IOILists:
    """mechscope's own short lists: 4 ABBA templates (+ their BABA forms), 22 names.

    >>> lists = default_ioi_lists()
    >>> lists.baba[0]
    'When [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]'
    """
    return IOILists(names=_NAMES, abba=_ABBA, baba=tuple(_to_baba(t) for t in _ABBA),
                    places=_PLACES, objects=_OBJECTS)  # fmt: skip


def load_ioi_lists(path: str | Path) -> IOILists:
    """Load ACDC's lists (``ioi_templates_names.json``: NAMES, BABA_TEMPLATES,
    ABBA_TEMPLATES__derived, PLACES, OBJECTS), from the file or its folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "ioi_templates_names.json"
    if not p.is_file():
        raise InputError(f"no IOI list file at {p}; pass the path of ioi_templates_names.json")
    data = json.loads(p.read_text(encoding="utf-8"))
    keys = ("NAMES", "BABA_TEMPLATES", "PLACES", "OBJECTS")
    if not isinstance(data, dict) or any(not data.get(k) for k in keys):
        raise InputError(f"{p} must be a JSON object with non-empty {', '.join(keys)}")
    baba = tuple(data["BABA_TEMPLATES"])
    abba = tuple(data.get("ABBA_TEMPLATES__derived") or ())
    if not abba:  # the source's rule: swap the first [B] and [A] of the first clause
        abba = tuple(t.replace("[B] and [A]", "[A] and [B]", 1) for t in baba)
    return IOILists(names=tuple(data["NAMES"]), abba=abba, baba=baba,
                    places=tuple(data["PLACES"]), objects=tuple(data["OBJECTS"]))  # fmt: skip


_SLOT = re.compile(r" ?\[(A|B)\]")


def _encode_template(tok: Any, text: str) -> tuple[list[int], list[tuple[int, str]]]:
    """Token ids of a filled template with name slots left as ``-1``, and (position, slot)."""
    ids: list[int] = []
    slots: list[tuple[int, str]] = []
    last = 0
    for m in _SLOT.finditer(text):
        ids.extend(encode(tok, text[last : m.start()]))
        slots.append((len(ids), m.group(1)))
        ids.append(-1)
        last = m.end()
    ids.extend(encode(tok, text[last:]))
    return ids, slots


def _patterns(pattern: Pattern, n: int, rng: np.random.Generator) -> list[str]:
    if pattern not in ("ABBA", "BABA", "mixed"):
        raise InputError(f"pattern must be 'ABBA', 'BABA' or 'mixed', got {pattern!r}")
    if pattern == "mixed":
        return ["ABBA" if x else "BABA" for x in rng.integers(0, 2, size=n)]
    return [pattern] * n


def _check_corrupt(corrupt: str) -> None:
    if corrupt not in ("abc", "flip"):
        raise InputError(f"corrupt must be 'abc' or 'flip', got {corrupt!r}")


def ioi(
    tokenizer: Any,
    n: int,
    *,
    seed: int = 0,
    pattern: Pattern = "mixed",
    corrupt: Corruption = "abc",
    lists: IOILists | None = None,
    prepend_bos: bool = True,
) -> TaskBatch:
    """Text IOI prompts for a tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer (or a model with ``.tokenizer``).
        n: number of prompts.
        seed: seed of a local generator.
        pattern: ``"ABBA"``, ``"BABA"`` or ``"mixed"`` (each row picks one).
        corrupt: ``"abc"`` or ``"flip"`` (module docstring).
        lists: names/templates (default :func:`default_ioi_lists`; ACDC's via :func:`load_ioi_lists`).
        prepend_bos: prepend the tokenizer's BOS id when it has one.

    Returns:
        A right-padded :class:`TaskBatch`; ``meta`` holds per row ``io_pos``, ``s1_pos``, ``s2_pos``
        (token positions), ``pattern``, ``template``, ``io`` and ``s`` names, and ``names`` (the
        single-token names used).
    """
    tok = as_tokenizer(tokenizer)
    check_n(n)
    _check_corrupt(corrupt)
    lists = lists or default_ioi_lists()
    found = {name: single_token(tok, " " + name) for name in dict.fromkeys(lists.names)}
    ids = {name: i for name, i in found.items() if i is not None}
    names = list(ids)
    if len(names) < 5:
        raise InputError(
            f"only {len(names)} of {len(found)} names are single tokens for this tokenizer; "
            "IOI needs 5 (IO, S and three ABC names): pass lists with more common names"
        )
    rng = np.random.default_rng(seed)
    bos = bos_prefix(tok, prepend_bos)
    clean, crp, ans, cans, meta_rows = [], [], [], [], []
    for pat in _patterns(pattern, n, rng):
        templates = lists.abba if pat == "ABBA" else lists.baba
        if not templates:
            raise InputError(f"the lists have no {pat} templates")
        t = int(rng.integers(len(templates)))
        text = templates[t]
        if not text.endswith(" [A]"):
            raise InputError(f"an IOI template must end with ' [A]' (the answer): {text!r}")
        text = text[: -len(" [A]")]
        text = text.replace("[PLACE]", str(rng.choice(lists.places)))
        text = text.replace("[OBJECT]", str(rng.choice(lists.objects)))
        row, slots = _encode_template(tok, text)
        row = bos + row
        chosen = [str(x) for x in rng.choice(names, size=5, replace=False)]
        io, s = chosen[0], chosen[1]
        fill = {"A": io, "B": s}
        b_slots = [p for p, k in slots if k == "B"]
        a_slot = next(p for p, k in slots if k == "A")
        cfill = dict.fromkeys(range(len(slots)), "")
        for j, (p, k) in enumerate(slots):
            row[len(bos) + p] = ids[fill[k]]
            if corrupt == "flip":
                cfill[j] = io if (k == "A" or p == b_slots[-1]) else s
            else:  # abc: IO -> C1, first S -> C2, second S -> C3
                cfill[j] = chosen[2] if k == "A" else chosen[3 if p == b_slots[0] else 4]
        crow = list(row)
        for j, (p, _) in enumerate(slots):
            crow[len(bos) + p] = ids[cfill[j]]
        clean.append(row)
        crp.append(crow)
        ans.append(ids[io])
        cans.append(ids[s])
        off = len(bos)
        meta_rows.append(
            (off + a_slot, off + b_slots[0], off + b_slots[-1], pat, t, io, s, len(row))
        )
    cols = list(zip(*meta_rows, strict=True))
    pad = pad_id(tok)
    return TaskBatch(
        task="ioi",
        clean=right_pad(clean, pad),
        corrupt=right_pad(crp, pad),
        answer=torch.tensor(ans),
        corrupt_answer=torch.tensor(cans),
        answer_pos=torch.tensor(cols[7]) - 1,
        lengths=torch.tensor(cols[7]),
        seed=seed,
        meta={"io_pos": list(cols[0]), "s1_pos": list(cols[1]), "s2_pos": list(cols[2]),
              "pattern": list(cols[3]), "template": list(cols[4]), "io": list(cols[5]),
              "s": list(cols[6]), "corrupt_kind": corrupt, "names": names, "pad_id": pad},
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class IOIVocab:
    """Token layout of the synthetic IOI task (defaults fit ``d_vocab=64``).

    Fixed word tokens: ``BOS=0 WHEN=1 AND=2 WENT=3 AT=4 COMMA=5 GAVE=6 TO=7``; names
    ``name_start .. name_start+n_names-1`` (8 .. 31); filler (places/objects) from
    ``filler_start`` (32) to ``d_vocab - 1``. Every row follows one 13-token template::

        pos  0   1    2  3   4  5    6  7     8     9  10   11  12
             BOS WHEN N1 AND N2 WENT AT PLACE COMMA S2 GAVE OBJ TO  -> IO

    ABBA: ``N1 = IO, N2 = S``; BABA: ``N1 = S, N2 = IO``; ``S2 = S``; PLACE/OBJ are fillers.

    >>> IOIVocab().names
    range(8, 32)
    """

    d_vocab: int = 64
    name_start: int = 8
    n_names: int = 24
    filler_start: int = 32

    WORDS: ClassVar[dict[str, int]] = {
        "BOS": 0,
        "WHEN": 1,
        "AND": 2,
        "WENT": 3,
        "AT": 4,
        "COMMA": 5,
        "GAVE": 6,
        "TO": 7,
    }

    def __post_init__(self) -> None:
        if self.name_start < 8 or self.n_names < 5:
            raise InputError(
                "IOIVocab needs name_start >= 8 (after the word tokens) and >= 5 names"
            )
        if self.name_start + self.n_names > self.filler_start or self.filler_start >= self.d_vocab:
            raise InputError(f"IOIVocab ranges overlap or exceed d_vocab={self.d_vocab}")

    @property
    def names(self) -> range:
        return range(self.name_start, self.name_start + self.n_names)

    @property
    def filler(self) -> range:
        return range(self.filler_start, self.d_vocab)


def synthetic_ioi(
    n: int,
    *,
    seed: int = 0,
    vocab: IOIVocab | None = None,
    pattern: Pattern = "mixed",
    corrupt: Corruption = "flip",
) -> TaskBatch:
    """Token-level IOI for zoo models (layout: :class:`IOIVocab`); the answer is the name that
    appeared once (IO).

    With ``corrupt="flip"`` (default) the corrupt row's S2 is IO, so its true answer is S
    (``corrupt_answer``); with ``"abc"`` the three name slots get three fresh names.
    ``meta`` holds ``io_pos``, ``s1_pos``, ``s2_pos`` per row and ``pattern``.

    >>> b = synthetic_ioi(4, seed=0)
    >>> b.clean.shape, b.meta["s2_pos"]
    (torch.Size([4, 13]), 9)
    >>> bool((b.clean[:, 9] == b.corrupt_answer).all() and (b.corrupt[:, 9] == b.answer).all())
    True
    """
    check_n(n)
    _check_corrupt(corrupt)
    v = vocab or IOIVocab()
    w = IOIVocab.WORDS
    rng = np.random.default_rng(seed)
    pats = _patterns(pattern, n, rng)
    names = rng.permuted(np.tile(np.asarray(v.names), (n, 1)), axis=1)[:, :5]
    fill = rng.choice(np.asarray(v.filler), size=(n, 2))
    io, s = names[:, 0], names[:, 1]
    abba = np.asarray([p == "ABBA" for p in pats])
    clean = np.empty((n, 13), dtype=np.int64)
    clean[:] = [w["BOS"], w["WHEN"], 0, w["AND"], 0, w["WENT"], w["AT"], 0, w["COMMA"], 0,
                w["GAVE"], 0, w["TO"]]  # fmt: skip
    clean[:, 2] = np.where(abba, io, s)
    clean[:, 4] = np.where(abba, s, io)
    clean[:, 9] = s
    clean[:, 7], clean[:, 11] = fill[:, 0], fill[:, 1]
    cor = clean.copy()
    if corrupt == "flip":
        cor[:, 9] = io
    else:
        cor[:, 2] = np.where(abba, names[:, 2], names[:, 3])
        cor[:, 4] = np.where(abba, names[:, 3], names[:, 2])
        cor[:, 9] = names[:, 4]
    return TaskBatch(
        task="ioi_synthetic",
        clean=torch.from_numpy(clean),
        corrupt=torch.from_numpy(cor),
        answer=torch.from_numpy(io.copy()),
        corrupt_answer=torch.from_numpy(s.copy()),
        answer_pos=torch.full((n,), 12, dtype=torch.long),
        seed=seed,
        meta={"io_pos": np.where(abba, 2, 4).tolist(), "s1_pos": np.where(abba, 4, 2).tolist(),
              "s2_pos": 9, "pattern": pats, "corrupt_kind": corrupt},
    )  # fmt: skip
