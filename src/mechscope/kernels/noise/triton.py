"""Triton kernel of the causal-tracing corruption step (same contract as ``reference.py``).

One program per (row, position, block of ``d_model``): it reads the position's noise slot and
writes ``embeds + scale * noise[slot]`` (computed in float32, float64 for float64 embeddings) if
the slot is ``>= 0``, else an exact copy of ``embeds``, into a new tensor; ``scale == 0`` returns
a copy without launching the kernel.

Jitted on first use, so ``TRITON_INTERPRET=1`` set before the first call runs it on CPU tensors.
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
def _noise_kernel(
    out_ptr, emb_ptr, noise_ptr, slot_ptr, scale,
    n_pos, d,
    s_ob, s_ot, s_od,
    s_eb, s_et, s_ed,
    s_nb, s_nt, s_nd,
    s_sb, s_st,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // n_pos
    t = row % n_pos
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < d
    slot = tl.load(slot_ptr + b * s_sb + t * s_st).to(tl.int64)
    x = tl.load(emb_ptr + b * s_eb + t * s_et + offs * s_ed, mask=inside)
    hit = (offs * 0 + slot) >= 0  # [BLOCK], all equal: a block mask
    n = tl.load(noise_ptr + b * s_nb + slot * s_nt + offs * s_nd, mask=inside & hit, other=0.0)
    y = (x.to(COMPUTE) + scale * n.to(COMPUTE)).to(x.dtype)
    tl.store(out_ptr + b * s_ob + t * s_ot + offs * s_od, tl.where(hit, y, x), mask=inside)


def _kernel() -> Any:
    interpret = bool(triton.knobs.runtime.interpret)
    if interpret not in _JITTED:
        _JITTED[interpret] = triton.jit(_noise_kernel)
    return _JITTED[interpret]


def add_subject_noise(embeds: Tensor, noise: Tensor, slots: Tensor, scale: float) -> Tensor:
    """``embeds + scale * noise`` on the positions with ``slots >= 0``; a new tensor.

    Same contract as :func:`mechscope.kernels.noise.reference.add_subject_noise`; inputs are
    assumed checked by :func:`mechscope.kernels.add_subject_noise`.
    """
    if scale == 0:
        return embeds.clone()  # the identity, bit for bit (-0.0 + 0.0 would give +0.0)
    out = torch.empty_like(embeds)
    n_batch, n_pos, d = embeds.shape
    if out.numel() == 0:
        return out
    slots = slots.to(device=embeds.device)
    block = min(triton.next_power_of_2(d), _MAX_BLOCK)
    compute = tl.float64 if embeds.dtype == torch.float64 else tl.float32
    grid = (n_batch * n_pos, triton.cdiv(d, block))
    _kernel()[grid](
        out, embeds, noise, slots, float(scale),
        n_pos, d,
        *out.stride(), *embeds.stride(), *noise.stride(), *slots.stride(),
        COMPUTE=compute, BLOCK=block,
    )  # fmt: skip
    return out
