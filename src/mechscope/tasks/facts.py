"""Facts: subject + relation -> attribute, synthetic (zoo) and from ROME's ``known_1000``.

Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"; code
kmeng01/rome) finds facts recalled by MLPs at the last subject token (METHODS.md sections 1, 7).

- :class:`FactWorld`: a synthetic world for zoo models. Subjects are multi-token (``subject_len``
  tokens from the subject range), each (subject, relation) has one attribute. A row is
  ``[BOS] s_1 .. s_k REL`` and the answer is the attribute token. Vocabulary layout::

      0                               BOS
      1 .. n_relations                relation tokens
      next n_attributes ids           attribute tokens
      the rest, up to d_vocab         subject tokens (shared between subjects)

  Subjects share tokens, so only the whole subject (not its last token alone) fixes the fact.
  The corrupt row is another subject of the same length whose attribute for that relation differs.
- :func:`load_rome_facts` reads ROME-format JSON (``known_1000.json``) into :class:`RomeFact`;
  :func:`rome_facts` tokenizes them into a :class:`TaskBatch` (corrupt = the prompt with another
  subject of equal token length, same relation preferred; answer = first token of
  ``" " + attribute``); :func:`filter_known` keeps the facts a model predicts top-1.

Caveats: ROME's facts were selected for GPT-2 XL; filter them for your model. Text rows have
unequal lengths and are right-padded; score each row at its own ``answer_pos``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechscope.errors import InputError
from mechscope.tasks._text import as_tokenizer, bos_prefix, check_n, encode, pad_id, right_pad
from mechscope.tasks.base import TaskBatch

__all__ = ["Fact", "FactWorld", "RomeFact", "filter_known", "load_rome_facts", "rome_facts"]


@dataclass(frozen=True, kw_only=True)
class Fact:
    """One synthetic fact: ``subject`` tokens + ``relation`` token -> ``attribute`` token."""

    subject: tuple[int, ...]
    relation: int
    attribute: int

    @property
    def prompt(self) -> tuple[int, ...]:
        """``(BOS, *subject, relation)`` with BOS = 0."""
        return (0, *self.subject, self.relation)


@dataclass(frozen=True, kw_only=True)
class FactWorld:
    """A synthetic fact world (see the module docstring for the layout).

    Args:
        n_subjects: number of distinct subjects.
        subject_len: tokens per subject, an int or an inclusive ``(min, max)`` range.
        n_relations: relation tokens.
        n_attributes: attribute tokens.
        d_vocab: vocabulary size; the ids after relations and attributes are subject tokens.
        seed: fixes subjects and attributes (the world), not the batches sampled from it.

    >>> w = FactWorld(n_subjects=20, subject_len=(2, 3), n_relations=2, n_attributes=8, d_vocab=64)
    >>> len(w.facts()), w.subject_tokens
    (40, range(11, 64))
    >>> b = w.batch(4, seed=0, subject_len=2)
    >>> b.clean.shape, bool((b.answer != b.corrupt_answer).all())
    (torch.Size([4, 4]), True)
    """

    n_subjects: int = 64
    subject_len: int | tuple[int, int] = (2, 3)
    n_relations: int = 4
    n_attributes: int = 32
    d_vocab: int = 256
    seed: int = 0

    #: The BOS id (fixed by the layout).
    bos = 0

    def __post_init__(self) -> None:
        lo, hi = self.len_range
        if not 1 <= lo <= hi:
            raise InputError(
                f"subject_len must be >= 1 (or a (min, max) range), got {self.subject_len!r}"
            )
        if self.n_relations < 1 or self.n_attributes < 2 or self.n_subjects < 2:
            raise InputError("a FactWorld needs >= 1 relation, >= 2 attributes and >= 2 subjects")
        n_tok = len(self.subject_tokens)
        if n_tok < 2 or n_tok**lo < self.n_subjects:
            raise InputError(
                f"d_vocab={self.d_vocab} leaves {n_tok} subject tokens, too few for "
                f"{self.n_subjects} subjects of {lo}+ tokens; raise d_vocab or subject_len"
            )

    @property
    def len_range(self) -> tuple[int, int]:
        s = self.subject_len
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def relation_tokens(self) -> range:
        return range(1, 1 + self.n_relations)

    @property
    def attribute_tokens(self) -> range:
        return range(1 + self.n_relations, 1 + self.n_relations + self.n_attributes)

    @property
    def subject_tokens(self) -> range:
        return range(1 + self.n_relations + self.n_attributes, self.d_vocab)

    @cached_property
    def subjects(self) -> tuple[tuple[int, ...], ...]:
        """The distinct subjects, as token tuples (fixed by ``seed``)."""
        rng = np.random.default_rng([self.seed, 1])
        lo, hi = self.len_range
        toks = np.asarray(self.subject_tokens)
        seen: dict[tuple[int, ...], None] = {}
        while len(seen) < self.n_subjects:
            k = int(rng.integers(lo, hi + 1))
            seen.setdefault(tuple(int(t) for t in rng.choice(toks, size=k)), None)
        return tuple(seen)

    @cached_property
    def table(self) -> np.ndarray:
        """``table[subject, relation]`` = attribute token (shape [n_subjects, n_relations])."""
        rng = np.random.default_rng([self.seed, 2])
        return rng.choice(
            np.asarray(self.attribute_tokens), size=(self.n_subjects, self.n_relations)
        )

    def facts(self) -> list[Fact]:
        """Every fact, subject-major (``n_subjects * n_relations`` of them)."""
        rels = list(self.relation_tokens)
        return [Fact(subject=s, relation=r, attribute=int(self.table[i, j]))
                for i, s in enumerate(self.subjects) for j, r in enumerate(rels)]  # fmt: skip

    def sequences(self) -> list[list[int]]:
        """Training sequences ``[BOS, *subject, relation, attribute]`` for every fact."""
        return [[self.bos, *f.subject, f.relation, f.attribute] for f in self.facts()]

    def batch(self, n: int, *, seed: int = 0, subject_len: int | None = None) -> TaskBatch:
        """``n`` facts of one subject length (default: the shortest), with corruptions.

        Each row is ``[BOS] subject REL``; the corrupt row swaps in another subject of the same
        length whose attribute for that relation differs (its true answer is ``corrupt_answer``).
        ``meta`` holds ``subject_span`` (start, end), ``relation_pos``, ``subject`` and
        ``corrupt_subject`` indices, and ``relation`` per row.
        """
        check_n(n)
        k = self.len_range[0] if subject_len is None else subject_len
        idx = [i for i, s in enumerate(self.subjects) if len(s) == k]
        if len(idx) < 2:
            raise InputError(
                f"fewer than 2 subjects of length {k}; pick a length in {self.len_range}"
            )
        rng = np.random.default_rng(seed)
        clean: list[list[int]] = []
        corrupt: list[list[int]] = []
        ans, cans, subj, csubj, rels = [], [], [], [], []
        while len(clean) < n:
            i = int(rng.choice(idx))
            j = int(rng.integers(self.n_relations))
            others = [o for o in idx if self.table[o, j] != self.table[i, j]]
            if not others:
                continue
            o = int(rng.choice(others))
            r = self.relation_tokens[j]
            clean.append([self.bos, *self.subjects[i], r])
            corrupt.append([self.bos, *self.subjects[o], r])
            ans.append(int(self.table[i, j]))
            cans.append(int(self.table[o, j]))
            subj.append(i)
            csubj.append(o)
            rels.append(r)
        return TaskBatch(
            task="facts",
            clean=torch.tensor(clean),
            corrupt=torch.tensor(corrupt),
            answer=torch.tensor(ans),
            corrupt_answer=torch.tensor(cans),
            answer_pos=torch.full((n,), k + 1, dtype=torch.long),
            seed=seed,
            meta={"subject_span": (1, 1 + k), "relation_pos": k + 1, "subject": subj,
                  "corrupt_subject": csubj, "relation": rels},
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class RomeFact:
    """One record of a ROME fact file (``known_1000.json``)."""

    known_id: int
    subject: str
    attribute: str
    template: str
    prompt: str
    relation_id: str
    prediction: str | None = None


def load_rome_facts(path: str | Path) -> list[RomeFact]:
    """Read a ROME-format JSON list (a file, or a folder holding ``known_1000.json``).

    Raises:
        InputError: missing file, not a JSON list, or a record without a required field.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "known_1000.json"
    if not p.is_file():
        raise InputError(f"no ROME fact file at {p}; pass the path of known_1000.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{p} is not readable JSON ({exc}); pass a ROME known_1000.json") from exc
    if not isinstance(data, list) or not data:
        raise InputError(f"{p} must hold a non-empty JSON list of fact records")
    out = []
    for k, rec in enumerate(data):
        missing = {"subject", "attribute", "template", "prompt", "relation_id"} - set(rec)
        if missing:
            raise InputError(f"record {k} of {p} lacks {sorted(missing)}; is it a ROME fact file?")
        out.append(RomeFact(known_id=int(rec.get("known_id", k)), subject=rec["subject"],
                            attribute=rec["attribute"], template=rec["template"],
                            prompt=rec["prompt"], relation_id=rec["relation_id"],
                            prediction=rec.get("prediction")))  # fmt: skip
    return out


def _split(tok: Any, fact: RomeFact) -> tuple[list[int], str, list[int], list[int]]:
    """(prefix ids, subject text with its leading space, suffix ids, subject ids)."""
    at = fact.prompt.find(fact.subject)
    if at < 0:
        raise InputError(f"subject {fact.subject!r} is not in prompt {fact.prompt!r}")
    before, after = fact.prompt[:at], fact.prompt[at + len(fact.subject) :]
    space = " " if before.endswith(" ") else ""
    subject = space + fact.subject
    return (
        encode(tok, before[: len(before) - len(space)]),
        subject,
        encode(tok, after),
        encode(tok, subject),
    )


def rome_facts(
    tokenizer: Any,
    facts: Sequence[RomeFact],
    *,
    seed: int = 0,
    prepend_bos: bool = True,
    same_relation: bool = True,
) -> TaskBatch:
    """Tokenize ROME facts into a right-padded :class:`TaskBatch`.

    Prompts are tokenized as prefix + subject + suffix, so subject spans are exact. The corrupt
    row puts in the subject of another fact with the same subject token length, the same
    ``relation_id`` and a different answer token, so ``corrupt_answer`` is that fact's answer.
    With ``same_relation=False`` a partner of another relation is used when there is no better
    one (its ``corrupt_answer`` then only marks "not the clean answer"). Facts without a partner
    are dropped (``meta["dropped"]`` lists their ids).
    ``meta`` holds per row ``known_id``, ``subject_span``, ``length``, ``same_relation``.
    """
    tok = as_tokenizer(tokenizer)
    if not facts:
        raise InputError("facts is empty; load some with load_rome_facts(path)")
    rng = np.random.default_rng(seed)
    bos = bos_prefix(tok, prepend_bos)
    parts = [_split(tok, f) for f in facts]
    answers = [encode(tok, " " + f.attribute)[0] for f in facts]
    clean, corrupt, ans, cans, meta_rows, dropped = [], [], [], [], [], []
    for i, (f, (pre, _, post, sub)) in enumerate(zip(facts, parts, strict=True)):
        ok = [j for j, p in enumerate(parts) if len(p[3]) == len(sub) and answers[j] != answers[i]]
        same = [j for j in ok if facts[j].relation_id == f.relation_id]
        pool = same if same_relation else (same or ok)
        if not pool:
            dropped.append(f.known_id)
            continue
        j = int(rng.choice(pool))
        clean.append(bos + pre + sub + post)
        corrupt.append(bos + pre + parts[j][3] + post)
        ans.append(answers[i])
        cans.append(answers[j])
        s0 = len(bos) + len(pre)
        meta_rows.append((f.known_id, (s0, s0 + len(sub)), len(clean[-1]), bool(same)))
    if not clean:
        raise InputError("no fact has a partner subject of equal token length; pass more facts")
    cols = list(zip(*meta_rows, strict=True))
    pad = pad_id(tok)
    return TaskBatch(
        task="facts_rome",
        clean=right_pad(clean, pad),
        corrupt=right_pad(corrupt, pad),
        answer=torch.tensor(ans),
        corrupt_answer=torch.tensor(cans),
        answer_pos=torch.tensor(cols[2]) - 1,
        lengths=torch.tensor(cols[2]),
        seed=seed,
        meta={"known_id": list(cols[0]), "subject_span": list(cols[1]), "length": list(cols[2]),
              "same_relation": list(cols[3]), "dropped": dropped, "pad_id": pad},
    )  # fmt: skip


@torch.no_grad()
def filter_known(
    model: Any,
    facts: Sequence[RomeFact],
    *,
    tokenizer: Any = None,
    batch_size: int = 32,
    prepend_bos: bool = True,
) -> list[RomeFact]:
    """The facts whose answer token (first token of ``" " + attribute``) the model predicts top-1.

    Args:
        model: a callable mapping ``[batch, pos]`` token ids to ``[batch, pos, vocab]`` logits
            (a ``TransformerBridge``; an output with ``.logits`` works too).
        facts: the facts to test.
        tokenizer: defaults to ``model.tokenizer``.
        batch_size: prompts per forward pass (right-padded).
        prepend_bos: prepend the tokenizer's BOS id when it has one.
    """
    tok = as_tokenizer(model if tokenizer is None else tokenizer)
    if not facts:
        raise InputError("facts is empty; load some with load_rome_facts(path)")
    bos = bos_prefix(tok, prepend_bos)
    rows = [bos + encode(tok, f.prompt) for f in facts]
    answers = torch.tensor([encode(tok, " " + f.attribute)[0] for f in facts])
    device = next((p.device for p in getattr(model, "parameters", list)()), torch.device("cpu"))
    keep: list[RomeFact] = []
    for s in range(0, len(facts), batch_size):
        chunk = rows[s : s + batch_size]
        tokens = right_pad(chunk, pad_id(tok)).to(device)
        out = model(tokens)
        logits = getattr(out, "logits", out)
        last = torch.tensor([len(r) - 1 for r in chunk], device=logits.device)
        pred = logits[torch.arange(len(chunk), device=logits.device), last].argmax(-1).cpu()
        keep.extend(f for f, p, a in zip(facts[s : s + batch_size], pred, answers[s : s + batch_size], strict=True) if p == a)  # fmt: skip
    return keep
