"""Choose the implementation of a kernel: Triton on a GPU, the plain-torch reference otherwise.

Rules, checked on every call (the environment is read each time, so a test can change it):

- ``MECHSCOPE_KERNELS=reference`` forces the torch reference everywhere.
- ``MECHSCOPE_KERNELS=triton`` forces the Triton kernel. On CUDA tensors it runs compiled; on CPU
  tensors only Triton's interpreter can run it, so ``TRITON_INTERPRET=1`` must be set too (the
  kernels are jitted lazily, on first use, so setting it before the first call is enough).
- unset (or ``auto``): Triton when every tensor is on a CUDA device and ``triton`` imports, the
  reference otherwise.

Both implementations of an op have the same signature and the same semantics (in-place or not,
bit for bit where the op is a copy), so the choice never changes a result beyond the dtype
tolerance of an arithmetic op.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from mechscope.errors import InputError, MissingPackageError

Backend = Literal["reference", "triton"]

#: The environment variable that forces a backend.
ENV = "MECHSCOPE_KERNELS"
_CHOICES = ("auto", "reference", "triton")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def choose(*tensors: torch.Tensor) -> Backend:
    """The backend that runs an op on ``tensors`` (see the module docstring for the rules).

    Raises:
        InputError: ``MECHSCOPE_KERNELS`` has an unknown value, or forces Triton on CPU tensors
            without ``TRITON_INTERPRET=1``.
        MissingPackageError: ``MECHSCOPE_KERNELS=triton`` but triton is not installed.
    """
    forced = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if forced not in _CHOICES:
        raise InputError(
            f"{ENV}={forced!r} is not a kernel backend; set it to one of {', '.join(_CHOICES)} "
            f"(or unset it: Triton on CUDA tensors, the torch reference otherwise)"
        )
    on_cuda = all(t.device.type == "cuda" for t in tensors)
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not triton_available():
            raise MissingPackageError(
                f"{ENV}=triton asks for Triton, but triton", "pip install triton"
            )
        if not on_cuda and not _interpreting():
            raise InputError(
                f"{ENV}=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                f"in the environment, or move the tensors to a CUDA device, or unset {ENV}"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"
