"""Head analyses and circuits: retrieval and streaming heads, head divergence and reinforcement,
attention sinks and calibration (METHODS.md sections 2-4).

Every analysis reads activations through :class:`mechscope.probes.Tracer` (or the patching
engine, gated against it), changes the model only through :func:`mechscope.probes.intervene`, and
returns a :class:`mechscope.results.Result`.
"""

from mechscope.circuits.attention import (
    by_layer,
    causal_mask,
    pattern_interventions,
    uniform_attention,
)

__all__ = ["by_layer", "causal_mask", "pattern_interventions", "uniform_attention"]
