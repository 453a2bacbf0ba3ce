"""The discrete sparse autoencoder of :mod:`mechscope.circuits.sae` (inference only; training is
:mod:`mechscope.circuits.sae_train`).

``encode`` gives feature activations ``ReLU(W_enc (scale * x - b_dec) + b_enc)``, ``decode`` the
reconstruction ``(W_dec f + b_dec) / scale`` with unit-norm dictionary atoms (columns of
``W_dec``), and ``codes`` the discrete code of O'Neill & Bui: the most active feature.

>>> sae = DiscreteSAE(4, 3, generator=torch.Generator().manual_seed(0))
>>> sae.W_dec.norm(dim=0).round(decimals=4).tolist()
[1.0, 1.0, 1.0]
>>> sae.codes(torch.zeros(2, 4)).tolist()   # zero biases: nothing fires on a zero row
[-1, -1]
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.errors import InputError


class DiscreteSAE(nn.Module):
    """A ReLU sparse autoencoder with a unit-norm dictionary and a tied pre-encoder bias.

    Args:
        d_in: input width (``d_model`` for head outputs in residual space).
        n_features: dictionary size.
        scale: input normalisation factor (``encode`` multiplies by it, ``decode`` divides).
        generator: seeds the initialisation (unit-norm random rows of ``W_enc`` and columns of
            ``W_dec``; zero biases).
    """

    scale: Tensor

    def __init__(self, d_in: int, n_features: int, *, scale: float = 1.0,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        if d_in < 1 or n_features < 1:
            raise InputError(
                f"an SAE needs d_in >= 1 and n_features >= 1, got {d_in}, {n_features}"
            )
        self.W_enc = nn.Parameter(
            nn.functional.normalize(torch.randn(n_features, d_in, generator=generator), dim=1)
        )
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.W_dec = nn.Parameter(
            nn.functional.normalize(torch.randn(d_in, n_features, generator=generator), dim=0)
        )
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: Float[Tensor, "*rows d"]) -> Float[Tensor, "*rows features"]:
        """Feature activations ``ReLU(W_enc (scale * x - b_dec) + b_enc)``."""
        if x.shape[-1] != self.d_in:
            raise InputError(f"the SAE reads vectors of width {self.d_in}, got {x.shape[-1]}")
        z = (x.to(self.W_enc.dtype) * self.scale - self.b_dec) @ self.W_enc.T + self.b_enc
        return torch.relu(z)

    def decode(self, f: Float[Tensor, "*rows features"]) -> Float[Tensor, "*rows d"]:
        """The reconstruction ``(W_dec f + b_dec) / scale``, in the input's units."""
        return (f @ self.W_dec.T + self.b_dec) / self.scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, reconstruction)``."""
        f = self.encode(x)
        return f, self.decode(f)

    @torch.no_grad()
    def codes(self, x: Float[Tensor, "*rows d"]) -> Int[Tensor, " *rows"]:
        """The discrete code of each row: its most active feature; -1 where no feature is active
        (a silent row has no argmax; the paper's ``argmax`` would call it feature 0)."""
        f = self.encode(x)
        top = f.max(-1)
        return torch.where(top.values > 0, top.indices, torch.full_like(top.indices, -1))

    @torch.no_grad()
    def normalize_dictionary_(self) -> None:
        """Rescale every dictionary atom (column of ``W_dec``) to unit norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def state(self) -> dict[str, Tensor]:
        """The weights as plain tensors (what a stored result keeps); :meth:`from_state` rebuilds."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> DiscreteSAE:
        """The SAE whose :meth:`state` is ``state``."""
        n_features, d_in = state["W_enc"].shape
        sae = cls(int(d_in), int(n_features))
        sae.load_state_dict(state)
        return sae.eval()


__all__ = ["DiscreteSAE"]
