"""Triton kernel of the patch scatter (same signature and semantics as ``reference.py``).

One program per (variant, batch row, block of the last axis): it reads the variant's position and
head (``-1``: every one, looped over), then copies ``clean[b, t, h, block]`` into
``variants[v, b, t, h, block]``. Residual-like sites are viewed as one head (an ``unsqueeze``, no
copy), so one kernel serves both layouts; any strides work, and the write is in place.

The kernel is jitted on first use, not at import, so that setting ``TRITON_INTERPRET=1`` before
the first call (rather than before the import) is enough to run it on CPU tensors.
"""

from __future__ import annotations

from typing import Any, no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor

_JITTED: dict[bool, Any] = {}
_MAX_BLOCK = 1024


@no_type_check
def _scatter_kernel(
    var_ptr, clean_ptr, pos_ptr, head_ptr,
    n_pos, n_head, d,
    s_vv, s_vb, s_vt, s_vh, s_vd,
    s_cb, s_ct, s_ch, s_cd,
    BLOCK: tl.constexpr,
):  # fmt: skip
    v = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < d
    p = tl.load(pos_ptr + v).to(tl.int64)
    h = tl.load(head_ptr + v).to(tl.int64)
    t0 = tl.where(p < 0, 0, p)
    t1 = tl.where(p < 0, n_pos, p + 1)
    h0 = tl.where(h < 0, 0, h)
    h1 = tl.where(h < 0, n_head, h + 1)
    for t in range(t0, t1):
        for hh in range(h0, h1):
            src = clean_ptr + b * s_cb + t * s_ct + hh * s_ch + offs * s_cd
            dst = var_ptr + v * s_vv + b * s_vb + t * s_vt + hh * s_vh + offs * s_vd
            tl.store(dst, tl.load(src, mask=inside), mask=inside)


def _kernel() -> Any:
    interpret = bool(triton.knobs.runtime.interpret)
    if interpret not in _JITTED:
        _JITTED[interpret] = triton.jit(_scatter_kernel)
    return _JITTED[interpret]


def scatter_patches(
    variants: Tensor, clean: Tensor, positions: Tensor, heads: Tensor | None = None
) -> Tensor:
    """Copy ``clean`` into ``variants`` at each variant's (position[, head]), in place.

    Same contract as :func:`mechscope.kernels.patch_scatter.reference.scatter_patches`; inputs
    are assumed checked by :func:`mechscope.kernels.scatter_patches`.
    """
    n_var, n_batch, n_pos = variants.shape[:3]
    v5 = variants if heads is not None else variants.unsqueeze(3)  # [V, B, T, H, D] view
    c4 = clean if heads is not None else clean.unsqueeze(2)  # [B, T, H, D] view
    d = v5.shape[4]
    pos = positions.to(device=variants.device, dtype=torch.int64).contiguous()
    if heads is None:
        hd = torch.zeros(n_var, dtype=torch.int64, device=variants.device)
    else:
        hd = heads.to(device=variants.device, dtype=torch.int64).contiguous()
    if variants.numel() == 0:
        return variants
    block = min(triton.next_power_of_2(d), _MAX_BLOCK)
    grid = (n_var, n_batch, triton.cdiv(d, block))
    _kernel()[grid](
        v5, c4, pos, hd,
        n_pos, v5.shape[3], d,
        *v5.stride(), *c4.stride(),
        BLOCK=block,
    )  # fmt: skip
    return variants
