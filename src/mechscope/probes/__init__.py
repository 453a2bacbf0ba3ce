"""Probes: the hook-based tracer, interventions on the forward pass, and linear probes."""

from __future__ import annotations

from mechscope.probes.hooks import count_hooks, hook_names, hooked
from mechscope.probes.interventions import (
    AddVector,
    Apply,
    Intervention,
    MeanAblate,
    Patch,
    Resample,
    Scale,
    Zero,
    intervene,
)
from mechscope.probes.linear import LinearProbe, ProbeSweep, features, probe_layers
from mechscope.probes.sites import SITES, hook_for, parse_sites
from mechscope.probes.trace import Trace, TraceWriter, iter_shards, open_trace
from mechscope.probes.tracer import TraceConfig, Tracer, tokenize, trace, trace_with_grad

__all__ = [
    "AddVector",
    "Apply",
    "Intervention",
    "MeanAblate",
    "Patch",
    "Resample",
    "Scale",
    "Zero",
    "intervene",
    "LinearProbe",
    "ProbeSweep",
    "features",
    "probe_layers",
    "SITES",
    "Trace",
    "TraceConfig",
    "TraceWriter",
    "Tracer",
    "count_hooks",
    "hook_for",
    "hook_names",
    "hooked",
    "iter_shards",
    "open_trace",
    "parse_sites",
    "tokenize",
    "trace",
    "trace_with_grad",
]
