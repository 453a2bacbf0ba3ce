"""VAR's massive activations (Kang et al., ICLR 2025): residual dimensions far above the token's
RMS, carried by attention-sink tokens. Used by :func:`mechscope.circuits.sinks.find_sinks`; see
the caveats on the threshold in :mod:`mechscope.circuits.sinks`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError

__all__ = ["Massive", "massive_dims"]


class Massive(NamedTuple):
    """``dims`` (sorted) over the threshold on some token; ``tokens`` ``[batch, pos]`` carrying
    one; ``peak`` ``[batch, pos]`` the largest normalised value of each token."""

    dims: Tensor
    tokens: Tensor
    peak: Tensor


def massive_dims(resid: Float[Tensor, "batch pos d_model"], threshold: float = 20.0,
                 lengths: Tensor | None = None, eps: float = 1e-6) -> Massive:  # fmt: skip
    """VAR's criterion ``|h_d| / rms(h) > threshold`` (RMS-normalised, no norm weight).

    >>> h = torch.ones(1, 3, 1024); h[0, 0, 7] = 400.0
    >>> m = massive_dims(h)
    >>> m.dims.tolist(), m.tokens.tolist()
    ([7], [[True, False, False]])
    """
    if not float(threshold) > 0 or not math.isfinite(threshold):
        raise InputError(f"massive_threshold must be a positive finite number, got {threshold}; "
                         "VAR uses 20 for massive activations")  # fmt: skip
    if resid.ndim != 3:
        raise InputError(f"resid must be [batch, pos, d_model], got {tuple(resid.shape)}")
    x = resid.float()
    normed = (x / x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()).abs()
    if lengths is not None:
        real = torch.arange(x.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]
        normed = normed * real[..., None].to(normed.device)
    over = normed > threshold  # [batch, pos, d_model]
    dims = over.flatten(0, 1).any(0).nonzero()[:, 0].cpu()
    return Massive(dims=dims, tokens=over.any(-1).cpu(), peak=normed.amax(-1).cpu())
