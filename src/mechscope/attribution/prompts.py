"""Prompt inputs of the tracing methods (causal tracing, FCCT), checked before any forward: the
prompt as token ids, a subject given as text or a token span, a one-token target.

>>> from mechscope.models import load
>>> m = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> _subject_span(m, _prompt_ids(m, [1, 2, 3]), (1, 3))
(1, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.types import Model


def _tokenizer(model: Model, what: str) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError(f"{what} is text but this model has no tokenizer (a native/zoo model); "
                         "pass token ids and a (start, end) token span instead")  # fmt: skip
    return tok


def _prompt_ids(model: Model, prompt: str | Sequence[int] | Tensor) -> Tensor:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty; give it some text")
        _tokenizer(model, "the prompt")
        ids = model.to_tokens(prompt, truncate=False, move_to_device=False)[0]
    else:
        ids = torch.as_tensor(prompt if isinstance(prompt, Tensor) else list(prompt))
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.numel() == 0:
            raise InputError("the prompt has no tokens")
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InputError(f"token ids must be an integer [pos] sequence; got {ids.dtype} "
                             f"{tuple(ids.shape)}")  # fmt: skip
    ids = ids.long().cpu()
    if ids.numel() == 0:
        raise InputError("the prompt has no tokens")
    n_ctx, vocab = int(model.cfg.n_ctx), int(model.cfg.d_vocab)
    if ids.numel() > n_ctx:
        raise InputError(f"the prompt has {ids.numel()} tokens but the model's context is {n_ctx}; "
                         "shorten it (prompts are never truncated)")  # fmt: skip
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"token ids must lie in 0..{vocab - 1}; got {ids.tolist()}")
    return ids


def text_span(pieces: list[str], text: str, what: str) -> tuple[int, int]:
    """The token span ``(start, end)`` covering the first occurrence of ``text`` in the decoded
    tokens ``pieces`` (a token partly inside counts).

    >>> text_span(["The", " Eiffel", " Tower", " is"], "Eiffel Tower", "subject")
    (1, 3)
    """
    whole = "".join(pieces)
    at = whole.find(text)
    if at < 0:
        raise InputError(f"{what} not found in the prompt's decoded tokens {whole!r}; check "
                         "spelling and spaces, or pass a (start, end) token span")  # fmt: skip
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    n = len(pieces)
    start = next(k for k in range(n) if ends[k] > at)
    end = next(k for k in range(n) if ends[k] >= at + len(text)) + 1
    return start, end


def _subject_span(model: Model, ids: Tensor, subject: str | tuple[int, int]) -> tuple[int, int]:
    n = ids.numel()
    if isinstance(subject, str):
        if not subject.strip():
            raise InputError("the subject is empty; give its text or a (start, end) token span")
        tok = _tokenizer(model, "the subject")
        return text_span([str(tok.decode([int(i)])) for i in ids], subject, f"subject {subject!r}")
    if not (isinstance(subject, tuple | list) and len(subject) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in subject)):
        raise InputError(f"subject must be its text or a (start, end) token span, got {subject!r}")
    start, end = int(subject[0]), int(subject[1])
    if not 0 <= start < end <= n:
        raise InputError(f"subject span ({start}, {end}) is not a non-empty span inside the "
                         f"prompt's {n} tokens (0 <= start < end <= {n})")  # fmt: skip
    return start, end


def _target_id(model: Model, target: str | int | None) -> int | None:
    if target is None:
        return None
    if isinstance(target, str):
        tok = _tokenizer(model, "the target")
        ids = tok(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"target {target!r} is {len(ids)} tokens ({list(ids)}); give one "
                             "token (often with a leading space, e.g. ' Paris') or its id")  # fmt: skip
        return int(ids[0])
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < int(model.cfg.d_vocab):
        raise InputError(f"target must be one token: text or an id in 0..{int(model.cfg.d_vocab) - 1}, "
                         f"got {target!r}")  # fmt: skip
    return int(target)


def _embedding_matrix(model: Model) -> Tensor:
    w = getattr(model, "W_E", None)
    if not isinstance(w, Tensor):
        w = model.embed.W_E
    return w.detach()
