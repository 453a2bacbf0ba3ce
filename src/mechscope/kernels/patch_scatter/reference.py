"""Plain-torch reference of the patch scatter: the semantics the Triton kernel must match.

Writes, in place, the clean activation into each patched variant at that variant's position
(and head)::

    variants [variant, batch, pos, d_model]          clean [batch, pos, d_model]
    variants [variant, batch, pos, head, d_head]     clean [batch, pos, head, d_head]
    positions [variant], heads [variant] (per-head sites only); -1 = every position / head

    variants[v, :, positions[v], heads[v], :] = clean[:, positions[v], heads[v], :]   for every v

Inputs are assumed valid: :func:`mechscope.kernels.scatter_patches` checks them and dispatches
here or to :mod:`mechscope.kernels.patch_scatter.triton`. Tests and benchmarks import this module
as the oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The index meaning "every position" (in ``positions``) or "every head" (in ``heads``).
ALL = -1


def scatter_patches(
    variants: Tensor, clean: Tensor, positions: Tensor, heads: Tensor | None = None
) -> Tensor:
    """Copy ``clean`` into ``variants`` at each variant's (position[, head]), in place.

    Args:
        variants: ``[variant, batch, pos, d_model]`` or ``[variant, batch, pos, head, d_head]``;
            written in place.
        clean: ``variants.shape[1:]``, same dtype and device.
        positions: ``[variant]`` integer; ``-1`` patches every position.
        heads: ``[variant]`` integer for per-head sites (``-1``: every head), else ``None``.

    Returns:
        ``variants`` itself (the same tensor object), patched.
    """
    n_var = variants.shape[0]
    positions = positions.to(device=variants.device, dtype=torch.long)
    if heads is not None:
        heads = heads.to(device=variants.device, dtype=torch.long)
    some_all = bool((positions == ALL).any()) or (heads is not None and bool((heads == ALL).any()))
    if not some_all:
        rows = torch.arange(n_var, device=variants.device)
        if heads is None:
            # variants[rows, :, positions] is [variant, batch, d_model]
            variants[rows, :, positions] = clean[:, positions].transpose(0, 1)
        else:
            # variants[rows, :, positions, heads] is [variant, batch, d_head]
            variants[rows, :, positions, heads] = clean[:, positions, heads].transpose(0, 1)
        return variants
    n_pos = variants.shape[2]
    t = torch.arange(n_pos, device=variants.device)
    sel = (positions[:, None] == ALL) | (positions[:, None] == t)  # [variant, pos]
    if heads is None:
        mask = sel[:, None, :, None]  # [variant, 1, pos, 1]
    else:
        h = torch.arange(variants.shape[3], device=variants.device)
        sel_h = (heads[:, None] == ALL) | (heads[:, None] == h)  # [variant, head]
        cells = sel[:, :, None] & sel_h[:, None, :]  # [variant, pos, head]
        mask = cells[:, None, :, :, None]  # [variant, 1, pos, head, 1]
    variants.copy_(torch.where(mask, clean.unsqueeze(0), variants))
    return variants
