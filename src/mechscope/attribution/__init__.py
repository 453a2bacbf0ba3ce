"""Attribution: exact activation patching, batched (:func:`patch_sweep`).

>>> from mechscope.attribution import patch_sweep, PatchResult
"""

from mechscope.attribution.patching import (
    PATCH_SITES,
    PatchSite,
    SweepConfig,
    naive_flops_ratio,
    patch_sweep,
    plan_chunk,
)
from mechscope.attribution.result import PatchResult

__all__ = ["PATCH_SITES", "PatchResult", "PatchSite", "SweepConfig", "naive_flops_ratio",
           "patch_sweep", "plan_chunk"]  # fmt: skip
