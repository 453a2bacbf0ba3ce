"""Plain-torch reference of the causal-tracing corruption step: the semantics the kernel matches.

ROME's causal tracing (Meng et al. 2022, METHODS.md §1) adds Gaussian noise, scaled by
``nu = 3 * sigma``, to the token embeddings of the subject positions of the noisy rows::

    embeds [batch, pos, d_model]        noise [batch, pos, d_model] or [batch, n_subject, d_model]
    slots  [batch, pos] int: the noise row index of each position, -1 where it is not noised

    out[b, t] = embeds[b, t] + scale * noise[b, slots[b, t]]   where slots[b, t] >= 0
    out[b, t] = embeds[b, t]                                   elsewhere (bit for bit)

The sum is computed in float32 (float64 for float64 embeddings) and rounded once to the
embeddings' dtype. ``scale == 0`` returns an exact copy. Out of place: ``embeds`` is not written.

Inputs are assumed valid: :func:`mechscope.kernels.add_subject_noise` checks them, turns the
subject mask into ``slots`` (:func:`slots_from_mask`) and dispatches here or to the Triton kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sum is computed in: float64 for float64 embeddings, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slots_from_mask(span_mask: Tensor, noise_len: int) -> Tensor:
    """``[batch, pos]`` int32 noise index per position (``-1``: not noised).

    Args:
        span_mask: ``[batch, pos]`` bool, the subject positions of each row.
        noise_len: ``noise.shape[1]``. When it equals ``pos`` the noise is indexed by position;
            otherwise by the rank of the position among the row's subject positions.
    """
    n_pos = span_mask.shape[1]
    if noise_len == n_pos:
        idx = torch.arange(n_pos, device=span_mask.device).expand_as(span_mask)
    else:
        idx = span_mask.long().cumsum(dim=1) - 1
    return torch.where(span_mask, idx, -1).to(torch.int32)


def add_subject_noise(embeds: Tensor, noise: Tensor, slots: Tensor, scale: float) -> Tensor:
    """``embeds + scale * noise`` on the positions with ``slots >= 0``; a new tensor.

    Args:
        embeds: ``[batch, pos, d_model]`` float, the rows to corrupt.
        noise: ``[batch, noise_pos, d_model]`` float standard-normal samples.
        slots: ``[batch, pos]`` integer index into ``noise``'s second axis, ``-1`` = untouched.
        scale: the noise scale ``nu``.

    Returns:
        ``[batch, pos, d_model]``, ``embeds.dtype``.
    """
    if scale == 0:
        return embeds.clone()
    hit = slots >= 0  # [batch, pos]
    idx = slots.clamp(min=0).long()[..., None].expand(-1, -1, noise.shape[2])
    picked = noise.gather(1, idx)  # [batch, pos, d_model]
    ct = compute_dtype(embeds.dtype)
    noisy = (embeds.to(ct) + scale * picked.to(ct)).to(embeds.dtype)
    return torch.where(hit[..., None], noisy, embeds)
