"""Fused scatter of clean activations into a batch of patched variants.

Batched activation patching runs V variants of the corrupted input at once; variant ``v`` gets
the clean activation at its position (and head). This op writes all of them in one pass::

    variants [variant, batch, pos, d_model]          clean [batch, pos, d_model]
    variants [variant, batch, pos, head, d_head]     clean [batch, pos, head, d_head]

    variants[v, :, positions[v], heads[v], :] = clean[:, positions[v], heads[v], :]

**In place**: ``variants`` (a buffer the caller owns, usually the corrupted activation repeated
V times) is overwritten and returned; nothing else is written, so entries outside the patched
(variant, position, head) cells are untouched bit for bit. ``-1`` (:data:`ALL`) in ``positions``
patches every position, in ``heads`` every head. ``clean`` must not overlap ``variants``. There
is no autograd through the Triton path, so both paths refuse tensors that require grad while
grad mode is on (run under ``torch.no_grad()``).

The reference (``reference.py``) and the kernel (``triton.py``) have the same signature and
semantics; :func:`scatter_patches` checks the inputs and picks one (rules in
:mod:`mechscope.kernels._dispatch`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.kernels import _dispatch
from mechscope.kernels.patch_scatter import reference
from mechscope.kernels.patch_scatter.reference import ALL

__all__ = ["ALL", "scatter_patches"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_index(name: str, idx: Tensor, n_var: int, size: int, axis: str) -> None:
    if idx.ndim != 1 or idx.shape[0] != n_var:
        raise InputError(
            f"{name} has shape {tuple(idx.shape)}, expected [{n_var}] (one {axis} per variant, "
            f"variants.shape[0] = {n_var}); pass a 1-D integer tensor of length {n_var}"
        )
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise InputError(f"{name} has dtype {idx.dtype}; pass integer indices (torch.long)")
    if n_var and (int(idx.min()) < ALL or int(idx.max()) >= size):
        raise InputError(
            f"{name} holds {axis} indices from {int(idx.min())} to {int(idx.max())}, but the "
            f"{axis} axis has {size} entries; use 0..{size - 1}, or -1 for every {axis}"
        )


def check(variants: Tensor, clean: Tensor, positions: Tensor, heads: Tensor | None) -> None:
    """Raise :class:`InputError` naming the mismatch and the fix unless the inputs fit together."""
    if variants.ndim not in (4, 5):
        raise InputError(
            f"variants has {variants.ndim} axes {tuple(variants.shape)}; expected "
            f"[variant, batch, pos, d_model] or [variant, batch, pos, head, d_head]"
        )
    if tuple(clean.shape) != tuple(variants.shape[1:]):
        raise InputError(
            f"clean has shape {tuple(clean.shape)} but variants {tuple(variants.shape)} needs "
            f"clean of shape {tuple(variants.shape[1:])} (variants without its leading variant axis)"
        )
    if variants.dtype not in _FLOATS or clean.dtype != variants.dtype:
        raise InputError(
            f"variants is {variants.dtype} and clean is {clean.dtype}; both must be the same "
            f"float dtype (cast clean with clean.to(variants.dtype))"
        )
    if clean.device != variants.device:
        raise InputError(
            f"clean is on {clean.device} and variants on {variants.device}; move clean with "
            f"clean.to(variants.device)"
        )
    if torch.is_grad_enabled() and (variants.requires_grad or clean.requires_grad):
        raise InputError(
            "scatter_patches writes in place and has no autograd; call it under torch.no_grad() "
            "(or pass detached tensors)"
        )
    n_var, _, n_pos = variants.shape[:3]
    _check_index("positions", positions, n_var, n_pos, "position")
    if variants.ndim == 5 and heads is None:
        raise InputError(
            "variants is per-head [variant, batch, pos, head, d_head] but heads is None; pass "
            "heads: one head index per variant (-1 for every head)"
        )
    if variants.ndim == 4 and heads is not None:
        raise InputError(
            "heads was given but variants is [variant, batch, pos, d_model] (no head axis); "
            "pass heads=None, or per-head activations [variant, batch, pos, head, d_head]"
        )
    if heads is not None:
        _check_index("heads", heads, n_var, variants.shape[3], "head")


def scatter_patches(
    variants: Float[Tensor, "variant batch pos *site"],
    clean: Float[Tensor, "batch pos *site"],
    positions: Int[Tensor, " variant"],
    heads: Int[Tensor, " variant"] | None = None,
) -> Float[Tensor, "variant batch pos *site"]:
    """Write ``clean`` into each variant at its position (and head), in place.

    ``site`` is ``d_model`` for residual-like sites and ``head d_head`` for per-head sites
    (``hook_z``). For every variant ``v`` and every batch row ``b``:
    ``variants[v, b, positions[v], (heads[v],) :] = clean[b, positions[v], (heads[v],) :]``.

    Args:
        variants: ``[variant, batch, pos, d_model]`` or ``[variant, batch, pos, head, d_head]``,
            float; overwritten in place.
        clean: ``[batch, pos, d_model]`` or ``[batch, pos, head, d_head]``: ``variants.shape[1:]``,
            same dtype and device.
        positions: ``[variant]`` integer position per variant; ``-1`` (:data:`ALL`) = every
            position. Moved to ``variants.device`` if needed.
        heads: ``[variant]`` integer head per variant for per-head sites (``-1``: every head);
            ``None`` for residual-like sites.

    Returns:
        ``variants`` itself, patched (the same tensor object).

    Raises:
        InputError: mismatched shapes, dtypes or devices, indices out of range, heads given for a
            residual site (or missing for a per-head one), or tensors requiring grad.

    >>> import torch
    >>> variants = torch.zeros(2, 1, 3, 2)  # 2 variants of a [batch=1, pos=3, d_model=2] site
    >>> clean = torch.arange(6.0).reshape(1, 3, 2)
    >>> out = scatter_patches(variants, clean, torch.tensor([0, 2]))
    >>> out is variants
    True
    >>> out[:, 0]
    tensor([[[0., 1.],
             [0., 0.],
             [0., 0.]],
    <BLANKLINE>
            [[0., 0.],
             [0., 0.],
             [4., 5.]]])
    """
    check(variants, clean, positions, heads)
    if _dispatch.choose(variants, clean) == "triton":
        from mechscope.kernels.patch_scatter import triton as kernel

        return kernel.scatter_patches(variants, clean, positions, heads)
    return reference.scatter_patches(variants, clean, positions, heads)
