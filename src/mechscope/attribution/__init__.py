"""Attribution: exact activation patching, batched (:func:`patch_sweep`).

>>> from mechscope.attribution import patch_sweep, PatchResult
"""

from mechscope.attribution.attrib_patch import (
    AttributionPatchResult,
    attribution_patch,
    rank_agreement,
)
from mechscope.attribution.causal_trace import (
    AggregateTrace,
    CausalTraceConfig,
    CausalTraceResult,
    aggregate_traces,
    causal_trace,
    subject_embedding_std,
    window_layers,
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
           "CausalTraceResult", "aggregate_traces", "causal_trace", "subject_embedding_std",
           "window_layers", "PatchResult", "PatchSite", "SweepConfig",
           "attribution_patch", "naive_flops_ratio", "patch_sweep", "plan_chunk",
           "rank_agreement"]  # fmt: skip
