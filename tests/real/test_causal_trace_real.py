"""Causal tracing on SmolLM2: the Eiffel Tower fact, text prompt, text subject and target."""

from __future__ import annotations

import pytest
import torch

from mechscope.attribution.causal_trace import causal_trace
from mechscope.errors import InputError
from mechscope.probes import Tracer
from mechscope.probes.hooks import hooked

pytestmark = pytest.mark.real

PROMPT = "The Eiffel Tower is located in the city of"


def test_hook_embed_is_the_whole_input_on_llama(smollm2):
    """On a rotary model the token embedding (hook_embed) is what block 0 reads."""
    seen = {}

    def grab(act, hook):
        seen["embed"] = act.clone()

    tokens = smollm2.to_tokens(PROMPT)
    with torch.no_grad(), hooked(smollm2, [("hook_embed", grab)], role="read"), \
            Tracer(smollm2, sites=("resid_pre",), layers=(0,)) as tr:
        _, trace = tr.forward(tokens)
    assert torch.equal(seen["embed"], trace.get("resid_pre", 0))


def test_eiffel_tower_hidden_trace(smollm2):
    r = causal_trace(smollm2, PROMPT, "Eiffel Tower", target=" Paris", kind="hidden", samples=3,
                     progress=False)  # fmt: skip
    s, e = r.subject
    assert "".join(r.tokens[s:e]).strip() == "Eiffel Tower"
    assert r.p_clean > r.p_corrupt
    assert r.scores[-1, -1] == pytest.approx(r.p_clean, abs=1e-5)
    layer, pos = r.argmax()
    print(f"\np_clean={r.p_clean:.4f} p_corrupt={r.p_corrupt:.4f} argmax: layer {layer}, "
          f"pos {pos} {r.labels()[pos]!r} p={float(r.scores[layer, pos]):.4f}")  # fmt: skip
    sub = r.scores[:, s:e]
    ly, k = divmod(int(sub.argmax()), e - s)
    print(f"best subject cell: layer {ly}, pos {s + k} {r.labels()[s + k]!r} "
          f"p={float(sub.max()):.4f}")  # fmt: skip
    assert r.n_skipped >= s * r.scores.shape[0]  # positions before the subject are exact no-ops


def test_text_inputs_are_checked(smollm2):
    with pytest.raises(InputError, match="not found in the prompt"):
        causal_trace(smollm2, PROMPT, "Louvre", progress=False)
    with pytest.raises(InputError, match="tokens"):
        causal_trace(smollm2, PROMPT, "Eiffel Tower", target=" Paris France", progress=False)
    with pytest.raises(InputError, match="context"):
        causal_trace(smollm2, "a " * 9000, "a", progress=False)
