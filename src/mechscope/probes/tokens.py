"""Prompts to right-padded token ids, checked before any forward.

Text is tokenized exactly as ``model.to_tokens`` does (BOS for Llama, ``[CLS] ... [SEP]`` for
BERT) but *without* its silent truncation to ``n_ctx``: a prompt longer than the context is an
:class:`~mechscope.errors.InputError` naming its length. Rows are padded with the one padding
rule of :mod:`mechscope.tasks.base` (right padding, :func:`~mechscope.tasks.base.pad_id`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.tasks.base import TaskBatch, pad_id, right_pad
from mechscope.types import Model

# Token ids are an integer [batch, pos] tensor; any other tensor gets a clear InputError.
Prompts = str | Sequence[str] | Tensor | Sequence[Sequence[int]] | TaskBatch


def _text_rows(model: Model, items: list[object]) -> list[Tensor]:
    rows: list[Tensor] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item.strip():
                raise InputError(f"prompt {i} is empty; give it some text")
            if model.tokenizer is None:
                raise InputError(
                    "this model has no tokenizer (a native/zoo model); pass token ids instead of text"
                )
            ids = model.to_tokens(item, truncate=False, move_to_device=False)
            rows.append(ids[0].long().cpu())
        else:
            ids = torch.as_tensor(list(item), dtype=torch.long)  # type: ignore[call-overload]
            if ids.numel() == 0:
                raise InputError(f"prompt {i} has no tokens")
            rows.append(ids)
    return rows


def tokenize(model: Model, prompts: Prompts, *, pad: int | None = None, corrupt: bool = False
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Turn prompts into right-padded token ids and real lengths, checking the input.

    Strings are tokenized one by one like ``model.to_tokens`` (which adds BOS where the model
    expects it) but never truncated; token tensors are used as they are (all rows full length);
    a :class:`~mechscope.tasks.TaskBatch` gives its clean rows (``corrupt=True``: its corrupt
    rows) with its own ``lengths``. ``pad`` overrides the pad id.
    """
    n_ctx = int(model.cfg.n_ctx)
    if isinstance(prompts, TaskBatch):
        ids = prompts.corrupt if corrupt else prompts.clean
        rows = [ids[i, :n].long().cpu() for i, n in enumerate(prompts.real_lengths.tolist())]
    elif isinstance(prompts, Tensor):
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2 or prompts.shape[1] == 0 or prompts.shape[0] == 0:
            raise InputError(f"token ids must be a non-empty [batch, pos] tensor, got {tuple(prompts.shape)}")
        if prompts.dtype.is_floating_point:
            raise InputError("token ids must be integers, got a floating-point tensor")
        rows = list(prompts.long().cpu())
    else:
        items: list[object] = [prompts] if isinstance(prompts, str) else list(prompts)
        if not items:
            raise InputError("no prompt given; pass at least one non-empty prompt")
        rows = _text_rows(model, items)
    vocab = int(model.cfg.d_vocab)
    for i, row in enumerate(rows):
        if row.numel() > n_ctx:
            raise InputError(
                f"prompt {i} has {row.numel()} tokens but the model's context is {n_ctx}; "
                "shorten it or split it into windows"
            )
        if int(row.min()) < 0 or int(row.max()) >= vocab:
            raise InputError(f"prompt {i} has token ids outside [0, {vocab}); check the tokenizer")
    lengths = torch.tensor([r.numel() for r in rows])
    tokens = right_pad([r.tolist() for r in rows], pad_id(model.tokenizer) if pad is None else pad)
    return tokens, lengths
