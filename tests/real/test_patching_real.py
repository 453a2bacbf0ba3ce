"""The batched patching engine on SmolLM2 against TransformerLens's patching (the oracle)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching

from mechscope.attribution import patch_sweep
from mechscope.tasks.ioi import ioi

pytestmark = pytest.mark.real


def test_resid_pre_sweep_over_five_layers_equals_transformer_lens(smollm2):
    batch = ioi(smollm2, 1, seed=0)
    assert batch.seq_len <= 20
    rows = torch.arange(1)

    def ld(logits):
        at = logits[rows, batch.answer_pos]
        return (at[rows, batch.answer] - at[rows, batch.corrupt_answer]).mean()

    with torch.no_grad():
        c, k = float(ld(smollm2(batch.clean))), float(ld(smollm2(batch.corrupt)))
        _, cache = smollm2.run_with_cache(batch.clean)
    layers = 5
    # the oracle over layers 0..4: generic_activation_patch with an index_df restricted to them
    import itertools

    import pandas as pd

    idx = pd.DataFrame(list(itertools.product(range(layers), range(batch.seq_len))),
                       columns=["layer", "pos"])  # fmt: skip
    want = patching.generic_activation_patch(
        smollm2, batch.corrupt, cache, lambda lg: (ld(lg) - k) / (c - k),
        patching.layer_pos_patch_setter, "resid_pre", index_df=idx,
    ).view(layers, batch.seq_len)  # fmt: skip
    result = patch_sweep(smollm2, batch, site="resid_pre", progress=False)
    assert result.work["path"] == "engine"  # the engine's own Llama forward, not the hooks
    got = result.scores[:layers]
    err = float((got - want).abs().max())
    assert err <= 1e-4 * float(want.abs().max()) + 1e-5, err
