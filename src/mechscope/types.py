"""Type aliases shared across mechscope.

``Model`` is what :func:`mechscope.models.load` returns: a TransformerLens 4.x
``TransformerBridge`` in eval mode. Public functions take a ``Model`` rather than ``Any`` so that
mypy checks how the model is used (and beartype checks it at test time).

>>> from mechscope.types import Model
>>> Model.__name__
'TransformerBridge'
"""

from __future__ import annotations

from typing import TypeAlias

from transformer_lens.model_bridge import TransformerBridge

Model: TypeAlias = TransformerBridge

__all__ = ["Model"]
