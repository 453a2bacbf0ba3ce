"""A small sweep of each kind on SmolLM2, on the local backend and on Ray: the same numbers bit
for bit (two Ray workers, each loading SmolLM2 from its spec)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from mechscope.attribution import causal_traces, patch_sweep
from mechscope.circuits import head_statistics
from mechscope.data import known_facts
from mechscope.probes import trace
from mechscope.results import same
from mechscope.scale import Backend
from mechscope.tasks import ioi

pytestmark = pytest.mark.real

RAY2 = Backend(kind="ray", workers=2)
PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
           "The Eiffel Tower is located in the city of", "1 2 3 4 5 6 7 8 1 2 3 4 5 6 7 8",
           "Python is a programming language", "The quick brown fox jumps over the lazy dog"]  # fmt: skip


def _same(a, b) -> bool:
    return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)
               if f.name != "provenance")  # fmt: skip


def test_smollm2_sweeps_on_ray_equal_the_local_backend(smollm2, ray_cluster):
    a = head_statistics(smollm2, PROMPTS, batch_size=2, progress=False)
    b = head_statistics(smollm2, PROMPTS, batch_size=2, progress=False, backend=RAY2, shard_size=2)
    assert _same(a, b)
    ta = trace(smollm2, PROMPTS, sites=("heads",), layers=(0, 17), batch_size=2, progress=False)
    tb = trace(smollm2, PROMPTS, sites=("heads",), layers=(0, 17), batch_size=2, progress=False,
               backend=RAY2, shard_size=2)  # fmt: skip
    assert _same(ta, tb)
    facts = [{"prompt": f["prompt"], "subject": f["subject"]} for f in known_facts("smollm2")[:2]]
    ca = causal_traces(smollm2, facts, kind="mlp", samples=1, progress=False)
    cb = causal_traces(smollm2, facts, kind="mlp", samples=1, progress=False, backend=RAY2)
    assert all(_same(x, y) for x, y in zip(ca.traces, cb.traces, strict=True))
    assert ca.traces[0].p_clean > ca.traces[0].p_corrupt  # a real fact, really traced
    task = ioi(smollm2.tokenizer, 4, seed=0)
    pa = patch_sweep(smollm2, task, site="attn_out", by="all", progress=False, shard_size=2)
    pb = patch_sweep(smollm2, task, site="attn_out", by="all", progress=False, backend=RAY2,
                     shard_size=2)  # fmt: skip
    assert _same(pa, pb)
