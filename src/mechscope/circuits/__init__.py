"""Head analyses and circuits: retrieval and streaming heads, head divergence and reinforcement,
attention sinks and calibration, batched head statistics (METHODS.md sections 2-4).

Every analysis reads activations through :class:`mechscope.probes.Tracer` (or the patching
engine's decoder, gated against it), changes the model only through
:func:`mechscope.probes.intervene`, and returns a :class:`mechscope.results.Result` with
``to_frame()``, ``figure()``, ``save(store)`` and ``payload()`` (the ``--json`` body of
``mechscope heads ...``). Each module's ``default_run(model, ...)`` is what the command line and
the demo run on a model's built-in inputs.

============================  =====================================================================
module                        what
============================  =====================================================================
:mod:`.retrieval`             retrieval score of every head (Wu et al. 2024), masking validation
:mod:`.streaming`             DuoAttention gates: streaming vs retrieval (full-attention) heads
:mod:`.divergence`            head divergence (VHD, T-VHD) for any segment; head reinforcement (VHR)
:mod:`.sinks`                 ACT sinks, VAR massive dimensions, ACT calibration and head selection
:mod:`.head_stats`            previous-token / duplicate / induction / sink scores of all heads
:mod:`.attention`             shared interventions on attention patterns (uniform attention, ...)
============================  =====================================================================
"""

from mechscope.circuits.attention import (
    by_layer,
    causal_mask,
    pattern_interventions,
    uniform_attention,
)
from mechscope.circuits.divergence import (
    HeadDivergence,
    ReinforcementResult,
    evaluate_reinforcement,
    head_divergence,
    reinforce,
    select_reinforced,
)
from mechscope.circuits.head_stats import HeadStatistics, head_statistics
from mechscope.circuits.retrieval import (
    MaskingResult,
    RetrievalScores,
    masking_validation,
    retrieval_grid_scores,
    retrieval_scores,
)
from mechscope.circuits.sinks import (
    AttentionSinks,
    CalibrationResult,
    calibration,
    find_sinks,
    select_calibration_heads,
)
from mechscope.circuits.streaming import StreamingHeads, streaming_gates

__all__ = [
    "AttentionSinks",
    "CalibrationResult",
    "HeadDivergence",
    "HeadStatistics",
    "MaskingResult",
    "ReinforcementResult",
    "RetrievalScores",
    "StreamingHeads",
    "by_layer",
    "calibration",
    "causal_mask",
    "evaluate_reinforcement",
    "find_sinks",
    "head_divergence",
    "head_statistics",
    "masking_validation",
    "pattern_interventions",
    "reinforce",
    "retrieval_grid_scores",
    "retrieval_scores",
    "select_calibration_heads",
    "select_reinforced",
    "streaming_gates",
    "uniform_attention",
]
