"""Attribution: exact activation patching, batched (:func:`patch_sweep`, on the engine of
:mod:`mechscope.attribution.engine`), attribution patching, ROME causal tracing, fine-grained
causal tracing (FCCT) and representation injection (IRI).

>>> from mechscope.attribution import patch_sweep, PatchResult
"""

from mechscope.attribution.attrib_patch import (
    AttributionPatchResult,
    attribution_patch,
    rank_agreement,
)
from mechscope.attribution.causal_sweep import causal_traces
from mechscope.attribution.causal_trace import (
    AggregateTrace,
    CausalTraceConfig,
    CausalTraceResult,
    aggregate_traces,
    causal_trace,
    subject_embedding_std,
    window_layers,
)
from mechscope.attribution.causal_trace_result import CausalTraceSweep
from mechscope.attribution.engine import Engine
from mechscope.attribution.fcct import (
    FCCTConfig,
    FCCTResult,
    default_groups,
    fine_grained_trace,
    resolve_groups,
)
from mechscope.attribution.iri import (
    InjectionSpec,
    IRIConfig,
    IRIEvaluation,
    IRIPlan,
    evaluate_iri,
    inject,
    iri_plan,
)
from mechscope.attribution.patching import (
    PATCH_SITES,
    PatchSite,
    SweepConfig,
    naive_flops_ratio,
    patch_sweep,
    plan_chunk,
)
from mechscope.attribution.result import PatchResult

__all__ = ["PATCH_SITES", "AggregateTrace", "AttributionPatchResult", "CausalTraceConfig",
           "CausalTraceResult", "CausalTraceSweep", "aggregate_traces", "causal_trace", "causal_traces", "subject_embedding_std",
           "window_layers", "PatchResult", "PatchSite", "SweepConfig",
           "attribution_patch", "naive_flops_ratio", "patch_sweep", "plan_chunk",
           "rank_agreement", "Engine", "FCCTConfig", "FCCTResult", "default_groups",
           "fine_grained_trace", "resolve_groups", "InjectionSpec", "IRIConfig", "IRIEvaluation",
           "IRIPlan", "evaluate_iri", "inject", "iri_plan"]  # fmt: skip
