"""Head analyses and circuits: retrieval and streaming heads, head divergence and reinforcement,
attention sinks and calibration, batched head statistics, discrete-SAE circuit discovery, circuit
graphs and their evaluation against ground truth (METHODS.md sections 2-5).

Every analysis reads activations through :class:`mechscope.probes.Tracer` (or the patching
engine's decoder, gated against it), changes the model only through
:func:`mechscope.probes.intervene`, and returns a :class:`mechscope.results.Result` with
``to_frame()``, ``figure()``, ``save(store)`` and ``payload()`` (the ``--json`` body of
``mechscope heads ...``). Each module's ``default_run(model, ...)`` is what the command line and
the demo run on a model's built-in inputs.

============================  =====================================================================
module                        what
============================  =====================================================================
:mod:`.retrieval`             retrieval score of every head (Wu et al. 2024); masking validation in
                              :mod:`.retrieval_masking`
:mod:`.attn_path`             how analyses read attention: patterns, or statistics without them
:mod:`.streaming`             DuoAttention gates: streaming vs retrieval (full-attention) heads
:mod:`.divergence`            head divergence (VHD, T-VHD) for any segment; head reinforcement (VHR)
:mod:`.segment_mass`          attention each head puts on a context segment (either attention path)
:mod:`.sinks`                 ACT sinks, VAR massive dimensions, ACT calibration and head selection
:mod:`.head_stats`            previous-token / duplicate / induction / sink scores of all heads
:mod:`.attention`             shared interventions on attention patterns (uniform attention, ...)
:mod:`.sae`                   discrete-SAE circuit discovery (O'Neill & Bui 2024): node/edge scores
:mod:`.sae_model`             the discrete SAE (``encode``/``decode``/``codes``); training in
                              :mod:`.sae_train`
:mod:`.graph`                 :class:`Circuit`: nodes and weighted edges from any head scorer
:mod:`.evaluate`              score head rankings against ground truth; SAE vs the baselines
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
from mechscope.circuits.evaluate import CircuitEvaluation, evaluate_methods, ranking_metrics
from mechscope.circuits.graph import Circuit
from mechscope.circuits.head_stats import HeadStatistics, head_statistics
from mechscope.circuits.retrieval import (
    RetrievalScores,
    retrieval_grid_scores,
    retrieval_scores,
)
from mechscope.circuits.retrieval_masking import MaskingResult, masking_validation
from mechscope.circuits.sae import SAECircuit, SAEConfig, discover, sae_circuit, task_batch
from mechscope.circuits.sae_model import DiscreteSAE
from mechscope.circuits.sae_train import train_sae
from mechscope.circuits.segment_mass import SegmentAttention, segment_attention
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
    "Circuit",
    "CircuitEvaluation",
    "DiscreteSAE",
    "SAECircuit",
    "SAEConfig",
    "SegmentAttention",
    "discover",
    "evaluate_methods",
    "ranking_metrics",
    "sae_circuit",
    "task_batch",
    "train_sae",
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
    "segment_attention",
    "select_reinforced",
    "streaming_gates",
    "uniform_attention",
]
