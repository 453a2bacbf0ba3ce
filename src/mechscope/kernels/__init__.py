"""Kernels for batched patching: Triton beside plain-torch references.

Each op lives in ``kernels/<op>/`` with ``reference.py`` (plain torch) and ``triton.py`` (the
kernel) of the same signature and semantics; the op's public function checks its inputs, documents
every shape and dispatches (Triton on CUDA tensors, the reference otherwise;
``MECHSCOPE_KERNELS=reference|triton`` forces one, see :mod:`mechscope.kernels._dispatch`).
Tests and benchmarks import the same references.

- :func:`scatter_patches`: write clean activations into V patched variants by (variant,
  position[, head]), in place.
- :func:`add_subject_noise`: the corruption step of causal tracing (noise on the subject's token
  embeddings); :func:`subject_noise` draws the noise under the common-random-numbers seeding rule.
- :func:`attention_stats`: one layer's attention statistics (:class:`AttnStats`: row lse and
  entropy, key mass received, segment mass, argmax and top-k of selected rows) from its rotated
  queries and keys without materialising the ``[query, key]`` pattern; :func:`stats_from_pattern`
  reads the same from a materialised pattern, :func:`act_mean` the mean attention a key receives.
"""

from __future__ import annotations

from mechscope.kernels.attn_stats import (
    AttnStats,
    act_mean,
    attention_stats,
    stats_from_pattern,
)
from mechscope.kernels.noise import add_subject_noise, subject_noise
from mechscope.kernels.patch_scatter import ALL, scatter_patches

__all__ = [
    "ALL",
    "AttnStats",
    "act_mean",
    "add_subject_noise",
    "attention_stats",
    "scatter_patches",
    "stats_from_pattern",
    "subject_noise",
]
