"""The corruption step of causal tracing: scaled Gaussian noise on the subject's token embeddings.

ROME (Meng et al. 2022; METHODS.md §1) runs one batch of ``N + 1`` rows: row 0 clean, rows
``1..N`` with ``nu * z`` added to the token embeddings (not the positional ones) of the subject
positions, ``z`` standard normal and ``nu = 3 * sigma`` (sigma: the std of subject-token
embeddings). The same noise must be seen by every patched run (common random numbers), so the
noise is drawn once, from a seeded generator, by :func:`subject_noise`, and passed in; this op
only adds it. Shapes::

    embeds    [batch, pos, d_model]          the rows to corrupt (rows 1..N: pass embeds[1:])
    noise     [batch, pos, d_model]          indexed by position, or
              [batch, n_subject, d_model]    the k-th subject position of a row gets noise[:, k]
    span_mask [pos] or [batch, pos] bool     the subject positions
    -> out    [batch, pos, d_model]          a new tensor; unmasked positions equal embeds bit for bit

The sum is computed in float32 (float64 for float64 embeddings) and rounded once to the
embeddings' dtype; ``scale == 0`` is the identity bit for bit. Out of place (a hook returns the
result). No autograd through the Triton path, so both paths refuse inputs requiring grad while
grad mode is on.

Caveat: with ``[batch, n_subject, d_model]`` noise, ROME's convention, which subject position
gets which sample depends on the span; ``[batch, pos, d_model]`` noise ties samples to positions.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.kernels import _dispatch
from mechscope.kernels.noise import reference

__all__ = ["add_subject_noise", "subject_noise"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def subject_noise(
    n_rows: int,
    seq: int,
    d_model: int,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch seq d_model"]:
    """Standard-normal noise ``[n_rows, seq, d_model]`` for :func:`add_subject_noise`.

    Seeding rule (common random numbers): a fresh CPU ``torch.Generator`` seeded with ``seed``
    on every call, samples drawn in float32 with ``torch.randn`` on the CPU and then moved to
    ``device`` and cast to ``dtype``. So the same ``(seed, n_rows, seq, d_model)`` gives the same
    numbers on every call, device and backend, and every patched run of one trace sees the same
    corruption. Pass ``seq = pos`` to tie samples to positions, or ``seq = n_subject`` (ROME's
    convention) to give the k-th subject position the k-th sample.

    Args:
        n_rows: noisy rows N.
        seq: positions (``pos``) or subject positions (``n_subject``).
        d_model: width of the embeddings.
        seed: the generator seed.
        device: where the result goes (the generator is always on the CPU).
        dtype: the result's dtype.

    >>> a = subject_noise(2, 3, 4, seed=0)
    >>> a.shape, bool((a == subject_noise(2, 3, 4, seed=0)).all())
    (torch.Size([2, 3, 4]), True)
    """
    if min(n_rows, seq, d_model) < 0:
        raise InputError(f"noise shape ({n_rows}, {seq}, {d_model}) has a negative size")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(n_rows, seq, d_model, generator=gen, dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


def check(embeds: Tensor, noise: Tensor, span_mask: Tensor, scale: float) -> Tensor:
    """Raise :class:`InputError` naming the mismatch unless the inputs fit; return the mask ``[batch, pos]``."""
    if embeds.ndim != 3 or embeds.dtype not in _FLOATS:
        raise InputError(
            f"embeds is {embeds.dtype} {tuple(embeds.shape)}; expected a float "
            f"[batch, pos, d_model] tensor (the token embeddings of the rows to corrupt)"
        )
    n_batch, n_pos, d = embeds.shape
    if noise.ndim != 3 or noise.shape[0] != n_batch or noise.shape[2] != d:
        raise InputError(
            f"noise has shape {tuple(noise.shape)} but embeds {tuple(embeds.shape)} needs "
            f"[{n_batch}, {n_pos}, {d}] or [{n_batch}, n_subject, {d}]; draw it with "
            f"subject_noise({n_batch}, {n_pos}, {d}, seed=...)"
        )
    if not noise.dtype.is_floating_point:
        raise InputError(f"noise is {noise.dtype}; pass float standard-normal samples")
    if noise.device != embeds.device:
        raise InputError(
            f"noise is on {noise.device} and embeds on {embeds.device}; move it with "
            f"noise.to(embeds.device)"
        )
    if span_mask.dtype != torch.bool or span_mask.shape not in ((n_pos,), (n_batch, n_pos)):
        raise InputError(
            f"span_mask is {span_mask.dtype} {tuple(span_mask.shape)}; expected a bool [{n_pos}] "
            f"or [{n_batch}, {n_pos}] mask of the subject positions"
        )
    mask = span_mask.to(embeds.device).expand(n_batch, n_pos)
    if noise.shape[1] != n_pos and n_batch:
        counts = mask.sum(dim=1)
        if bool((counts != noise.shape[1]).any()):
            raise InputError(
                f"noise has {noise.shape[1]} samples per row but the rows have "
                f"{sorted(set(counts.tolist()))} subject positions; draw noise with "
                f"seq = the number of subject positions, or seq = {n_pos} (one sample per position)"
            )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"scale is {scale!r}; pass a finite float (ROME: nu = 3 * sigma)")
    if torch.is_grad_enabled() and (embeds.requires_grad or noise.requires_grad):
        raise InputError(
            "add_subject_noise has no autograd; call it under torch.no_grad() or detach the inputs"
        )
    return mask


def add_subject_noise(
    embeds: Float[Tensor, "batch pos d_model"],
    noise: Float[Tensor, "batch noise_pos d_model"],
    span_mask: Bool[Tensor, "*mask_batch pos"],
    scale: float,
) -> Float[Tensor, "batch pos d_model"]:
    """``embeds + scale * noise`` on the subject positions, ``embeds`` elsewhere; a new tensor.

    Args:
        embeds: ``[batch, pos, d_model]`` float token embeddings of the rows to corrupt.
        noise: ``[batch, pos, d_model]`` (sample per position) or ``[batch, n_subject, d_model]``
            (the k-th subject position of a row gets ``noise[:, k]``; every row must then have
            ``n_subject`` subject positions), float, on ``embeds.device``; from
            :func:`subject_noise`.
        span_mask: ``[pos]`` (same span in every row) or ``[batch, pos]`` bool subject mask.
        scale: the noise scale ``nu`` (ROME: 3 * the std of subject-token embeddings).

    Returns:
        ``[batch, pos, d_model]`` in ``embeds.dtype``; unmasked positions equal ``embeds`` bit
        for bit, and ``scale = 0`` returns an exact copy.

    Raises:
        InputError: mismatched shapes, dtypes or devices, a noise length that fits neither
            layout, a non-finite scale, or inputs requiring grad.

    >>> import torch
    >>> embeds = torch.zeros(1, 3, 2)
    >>> noise = torch.ones(1, 3, 2)
    >>> add_subject_noise(embeds, noise, torch.tensor([False, True, True]), 0.5)
    tensor([[[0.0000, 0.0000],
             [0.5000, 0.5000],
             [0.5000, 0.5000]]])
    >>> add_subject_noise(embeds, torch.ones(1, 1, 2), torch.tensor([False, True, False]), 2.0)
    tensor([[[0., 0.],
             [2., 2.],
             [0., 0.]]])
    """
    mask = check(embeds, noise, span_mask, scale)
    slots = reference.slots_from_mask(mask, noise.shape[1])
    if _dispatch.choose(embeds, noise) == "triton":
        from mechscope.kernels.noise import triton as kernel

        return kernel.add_subject_noise(embeds, noise, slots, float(scale))
    return reference.add_subject_noise(embeds, noise, slots, float(scale))
