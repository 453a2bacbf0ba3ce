"""Training the discrete SAE (:class:`~mechscope.circuits.sae_model.DiscreteSAE`, inference only).

:func:`train_sae` fits one on a few prompts' head outputs
(METHODS.md section 5): ``x^ = W_dec ReLU(W_enc (x - b) + b_enc) + b`` with unit-norm dictionary
atoms (the columns of ``W_dec``; renormalised after every step), loss ``MSE + l1 * |f|_1`` (the
L1 norm of each row's feature activations, averaged over rows), Adam, full batch.

One addition to the paper: with ``normalize=True`` (the default) the inputs are multiplied by one
scalar so that their mean L2 norm is ``sqrt(d_model)`` (SAELens' ``expected_average_only_in``),
and the factor is kept in the SAE (``encode`` applies it, ``decode`` undoes it). The loss weights
MSE against L1 by a fixed 0.02, which only means the same thing at one input scale: on the raw
head outputs of the zoo models (norms 0.2-1) 500 epochs leave the SAE reconstructing worse than
the mean (fraction of variance explained < 0); scaled, it explains 65-85%.

>>> x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
>>> sae, fit = train_sae(x, n_features=16, epochs=20, seed=0, progress=False)
>>> sae.codes(x).shape, fit.epochs
(torch.Size([40]), 20)
>>> bool(torch.equal(train_sae(x, n_features=16, epochs=20, seed=0, progress=False)[0].codes(x),
...                  sae.codes(x)))
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.circuits.sae_model import DiscreteSAE
from mechscope.errors import InputError


@dataclass(frozen=True, kw_only=True)
class SAEFit:
    """How a training run went.

    Attributes:
        epochs: full-batch steps taken.
        rows: training rows (prompts x heads).
        loss, mse, l1: the last step's loss and its two terms (on scaled inputs).
        fve: fraction of variance of the training rows explained by the reconstruction.
        scale: the input normalisation factor.
        alive: features active on at least one training row.
    """

    epochs: int
    rows: int
    loss: float
    mse: float
    l1: float
    fve: float
    scale: float
    alive: int


def input_scale(x: Float[Tensor, "rows d"]) -> float:
    """The factor that brings the mean L2 norm of the non-zero rows to ``sqrt(d)`` (1.0 when
    every row is zero). Zero rows (pruned heads) are left out so they do not inflate it.

    >>> input_scale(torch.ones(3, 4))
    1.0
    """
    norms = x.double().norm(dim=-1)
    norms = norms[norms > 0]
    if norms.numel() == 0:
        return 1.0
    return float(x.shape[-1] ** 0.5 / norms.mean())


def train_sae(
    x: Float[Tensor, "rows d"],
    *,
    n_features: int = 200,
    l1: float = 0.02,
    lr: float = 1e-3,
    epochs: int = 500,
    seed: int = 0,
    normalize: bool = True,
    progress: bool = True,
) -> tuple[DiscreteSAE, SAEFit]:
    """Fit a :class:`DiscreteSAE` to the rows ``x`` (full batch, Adam); deterministic given
    ``seed`` on one device (float32, CPU)."""
    if x.ndim != 2 or x.shape[0] < 1:
        raise InputError(f"train_sae needs rows [n, d] with n >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError("the SAE's training rows hold NaN or infinite values; the model's head "
                         "outputs overflowed (try float32 weights)")  # fmt: skip
    for name, value in (("n_features", n_features), ("epochs", epochs)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if l1 < 0 or lr <= 0:
        raise InputError(f"need l1 >= 0 and lr > 0, got l1={l1}, lr={lr}")

    x = x.detach().float().cpu()
    with _threads(1 if x.numel() * n_features < SMALL else None):
        return _fit(x, n_features=n_features, l1=l1, lr=lr, epochs=epochs, seed=seed,
                    normalize=normalize, progress=progress)  # fmt: skip


#: Below this many input elements x features, training runs on one thread: the matrices are so
#: small that a second thread only adds synchronisation (on a busy 2-core machine 500 epochs of
#: a zoo model's 120 x 64 rows took 0.7 s on one thread and 23 s on two).
SMALL = 50_000_000


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: leave them), then restore the count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(x: Tensor, *, n_features: int, l1: float, lr: float, epochs: int, seed: int,
         normalize: bool, progress: bool) -> tuple[DiscreteSAE, SAEFit]:  # fmt: skip
    from tqdm.auto import tqdm

    scale = input_scale(x) if normalize else 1.0
    gen = torch.Generator().manual_seed(seed)
    sae = DiscreteSAE(x.shape[1], n_features, scale=scale, generator=gen)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    xs = x * scale
    mse = l1_term = loss = torch.zeros(())
    with torch.enable_grad():
        for _ in tqdm(range(epochs), desc="SAE", unit="epoch", disable=not progress, leave=False):
            f = torch.relu((xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
            recon = f @ sae.W_dec.T + sae.b_dec
            mse = (recon - xs).pow(2).mean()
            l1_term = f.abs().sum(-1).mean()
            loss = mse + l1 * l1_term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.normalize_dictionary_()
    sae.eval()
    with torch.no_grad():
        f, recon = sae(x)
        var = (x - x.mean(0)).pow(2).sum()
        fve = float(1 - (recon - x).pow(2).sum() / var) if float(var) > 0 else 1.0
        alive = int((f > 0).any(0).sum())
    return sae, SAEFit(epochs=epochs, rows=int(x.shape[0]), loss=loss.item(), mse=mse.item(),
                       l1=l1_term.item(), fve=fve, scale=scale, alive=alive)  # fmt: skip


__all__ = ["SAEFit", "input_scale", "train_sae"]
