"""Causal tracing over many facts (:func:`causal_traces`), locally or on Ray.

Each fact is traced by :func:`mechscope.attribution.causal_trace` with the same settings (and
the same noise seed, as ROME does), independently of the others, so the traces do not depend on
how the facts are sharded: every backend gives the same numbers, bit for bit. The sweep returns
every fact's trace and their average by position bucket (:func:`aggregate_traces`).

>>> from mechscope.models import load
>>> m = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> sweep = causal_traces(m, [([1, 2, 3, 4], (1, 2)), ([5, 6, 7], (0, 2))], samples=2,
...                       progress=False)
>>> len(sweep.traces), sweep.aggregate.n_prompts
(2, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mechscope.attribution.causal_trace_result import CausalTraceSweep, aggregate_traces
from mechscope.errors import InputError
from mechscope.results import Provenance
from mechscope.scale import Backend, as_backend, map_shards, plan
from mechscope.types import Model

__all__ = ["causal_traces", "fact_args"]

Fact = Mapping[str, Any] | Sequence[Any]


def fact_args(fact: Fact, i: int) -> tuple[Any, Any, Any]:
    """``(prompt, subject, target)`` of one fact: a mapping with ``prompt``, ``subject`` and
    optionally ``target``, or a ``(prompt, subject[, target])`` tuple."""
    if isinstance(fact, Mapping):
        if "prompt" not in fact or "subject" not in fact:
            raise InputError(f"fact {i} has keys {sorted(fact)}; a fact needs 'prompt' and "
                             "'subject' (and may give 'target')")  # fmt: skip
        return fact["prompt"], fact["subject"], fact.get("target")
    if isinstance(fact, Sequence) and not isinstance(fact, str) and len(fact) in (2, 3):
        return fact[0], fact[1], fact[2] if len(fact) == 3 else None
    raise InputError(f"fact {i} is {fact!r}; give a dict with 'prompt' and 'subject' (and "
                     "'target'), or a (prompt, subject[, target]) tuple")  # fmt: skip


def trace_facts(model: Model, facts: list[tuple[Any, Any, Any]], **options: Any) -> list[Any]:
    """One shard: the local causal trace of each fact."""
    from mechscope.attribution.causal_trace import causal_trace

    return [causal_trace(model, p, s, target=t, progress=False, **options) for p, s, t in facts]


def causal_traces(
    model: Model,
    facts: Sequence[Fact],
    *,
    kind: str = "hidden",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    sigma: float | None = None,
    seed: int = 0,
    severed: str | None = None,
    max_bytes: int | None = None,
    engine: str = "auto",
    backend: str | Backend = "local",
    shard_size: int | None = None,
    progress: bool = True,
) -> CausalTraceSweep:
    """ROME causal tracing of many facts (see the module docstring).

    Args:
        model: the model.
        facts: each a dict with ``prompt``, ``subject`` and optionally ``target`` (one token;
            None: the clean top-1), or a ``(prompt, subject[, target])`` tuple; as in
            :func:`~mechscope.attribution.causal_trace`, a prompt is text or token ids and a
            subject its text or a ``(start, end)`` token span.
        kind, window, samples, noise, sigma, seed, severed, max_bytes, engine: as in
            :func:`~mechscope.attribution.causal_trace`, the same for every fact.
        backend: ``local`` or ``ray`` (or a :class:`~mechscope.scale.Backend`).
        shard_size: facts per shard (default 1: the shards balance across workers).
        progress: one bar over the facts.

    Raises:
        InputError: no facts, a malformed fact, or anything :func:`causal_trace` refuses (the
            first bad fact's error, raised at once on every backend).
        SweepIncomplete: a shard failed after its retries (Ray).
    """
    facts = list(facts)
    if not facts:
        raise InputError("causal_traces needs at least one fact")
    args = [fact_args(f, i) for i, f in enumerate(facts)]
    b = as_backend(backend, shard_size=shard_size)
    options = {"kind": kind, "window": window, "samples": samples, "noise": noise, "sigma": sigma,
               "seed": seed, "severed": severed, "max_bytes": max_bytes, "engine": engine}  # fmt: skip
    parts, _ = map_shards(model, trace_facts, plan(args, b.shard_size or 1), backend=b,
                          kwargs=options, desc=f"causal trace ({kind})", progress=progress)  # fmt: skip
    traces = tuple(r for part in parts for r in part)
    config = {**options, "n_facts": len(traces)}
    return CausalTraceSweep(provenance=Provenance.of(model, config, seed=seed), traces=traces,
                            aggregate=aggregate_traces(traces))  # fmt: skip
