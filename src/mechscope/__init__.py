"""mechscope: a mechanistic-interpretability workbench for transformer language models.

Axis vocabulary (used in every shape annotation and docstring of the package):

- ``batch``: prompts in a batch;
- ``pos``: token positions (``query``/``key`` for the two position axes of an attention pattern);
- ``layer``: transformer blocks;
- ``head``: attention heads of a layer (``kv_head`` for grouped key/value heads);
- ``d_head``, ``d_model``, ``d_mlp``: widths of a head's output, the residual stream and the FFN;
- ``feature``: sparse-autoencoder or probe features.

The foundation is :func:`mechscope.models.load` (a ``TransformerBridge`` from a spec),
:class:`mechscope.probes.Tracer` (the one place hooks are registered), and
:class:`mechscope.store.Store` (runs and results on disk).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
