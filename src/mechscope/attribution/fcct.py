"""Fine-grained causal tracing (FCCT): which component of which token group recovers the answer.

Method ("Causal Tracing of Object Representations in LVLMs", 2025, no public code; METHODS.md §1),
adapted from images to text. It is ROME's causal tracing (:mod:`mechscope.attribution.causal_trace`)
with two changes: the corruption covers a whole *segment* of the prompt, and each restore writes
the clean value of one component at *every* position of a named *token group*, at one layer:

1. clean run: ``p_clean = p(target)`` at the last position (target: the clean top-1 by default);
2. corrupted run: ``samples = N`` copies of the prompt with Gaussian noise ``nu * eps`` on the
   token embeddings of the segment, ``nu = noise * sigma`` (the same noise as ROME, drawn once:
   :func:`~mechscope.attribution.causal_trace.prepare_trace` with the segment as the "subject");
   ``p_corrupt`` = the mean over the N rows;
3. for every component ``c`` (``attn`` = ``attn_out``, ``mlp`` = ``mlp_out``, ``hidden`` = the
   block output ``resid`` = ``hook_resid_post``), group ``g`` and layer ``l``: restore the clean
   ``c`` at layer ``l`` (one layer, no window) at all positions of ``g`` into the N noisy rows and
   re-measure ``p_patched``. The score is the recovery rate
   ``RR = (p_patched - p_corrupt) / (p_clean - p_corrupt)``: 0 = nothing recovered, 1 = the clean
   answer fully back.

Groups are named contiguous token spans: ``(start, end)`` (end exclusive) or a substring of the
prompt (its first occurrence, resolved to the tokens that cover it). They must be non-empty,
inside the prompt and pairwise disjoint; they need not cover the prompt. The default partition
(:func:`default_groups`), the paper's groups without its question/context split:
``early context`` (before the segment), ``segment`` (the corrupted tokens; with
``split_segment=True``: ``segment first`` / ``segment middle`` / ``segment last``), ``late
context`` (after the segment, without the last token) and ``last token``; empty groups are left
out, and a segment that reaches the last token leaves that token to ``last token``.

All C x G x L variants run through one :func:`~mechscope.attribution.causal_trace.restore_probs`
call (batched, chunked under the memory budget). A restore at positions before the segment is an
exact no-op (causal attention: those values do not see the noise), so its RR is exactly 0.

Defaults: ``samples=10``, ``noise=3.0`` (``nu = 3 sigma``), ``sigma`` = the std of the token
embedding matrix, ``components=("attn", "mlp", "hidden")``.

Caveats: RR is a ratio; it needs a real total effect ``TE = p_clean - p_corrupt`` (|TE| < 1e-6 is
refused: add noise or pick another target) and is noisy when TE is small. RR can be negative or
above 1. One prompt, one answer token; average several results for a claim.

>>> from mechscope.models import load
>>> m = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> r = fine_grained_trace(m, [1, 2, 3, 4, 5, 6], (2, 4), samples=3, progress=False)
>>> r.group_names
('early context', 'segment', 'late context', 'last token')
>>> tuple(r.scores.shape)  # [component, group, layer]
(3, 4, 2)
>>> float(r.rr("hidden", "early context").abs().max())  # restoring before the segment: a no-op
0.0
>>> abs(r.rr("hidden", "last token")[-1].item() - 1.0) < 1e-6  # the last block's output
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from mechscope.attribution.causal_trace import (
    CausalTraceConfig,
    Restore,
    Variant,
    prepare_trace,
    restore_probs,
)
from mechscope.attribution.prompts import text_span
from mechscope.errors import InputError
from mechscope.probes.sites import check_site_on_model
from mechscope.results import Provenance, Result
from mechscope.types import Model

__all__ = ["COMPONENTS", "FCCTConfig", "FCCTResult", "default_groups", "fine_grained_trace",
           "resolve_groups"]  # fmt: skip

#: Component name -> the site restored.
COMPONENTS = {"attn": "attn_out", "mlp": "mlp_out", "hidden": "resid"}
#: The smallest |p_clean - p_corrupt| a recovery rate is normalised by.
MIN_TOTAL_EFFECT = 1e-6

GroupSpec = tuple[int, int] | str


@dataclass(frozen=True, kw_only=True)
class FCCTConfig:
    """Options of :func:`fine_grained_trace` (see its arguments)."""

    components: tuple[str, ...] = ("attn", "mlp", "hidden")
    samples: int = 10
    noise: float = 3.0
    sigma: float | None = None
    seed: int = 0
    split_segment: bool = False
    max_bytes: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        comps = tuple(self.components) if not isinstance(self.components, str) else (self.components,)
        object.__setattr__(self, "components", comps)
        bad = [c for c in comps if c not in COMPONENTS]
        if not comps or bad or len(set(comps)) != len(comps):
            raise InputError(f"components must be distinct names from {tuple(COMPONENTS)}, got "
                             f"{self.components!r}")  # fmt: skip
        # the remaining options are checked by CausalTraceConfig (one set of rules and messages)
        self.trace_config()

    def trace_config(self) -> CausalTraceConfig:
        """The causal-trace config whose corruption this trace uses."""
        return CausalTraceConfig(kind="hidden", samples=self.samples, noise=self.noise,
                                 sigma=self.sigma, seed=self.seed, max_bytes=self.max_bytes,
                                 progress=self.progress)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# groups


def default_groups(segment: tuple[int, int], n_pos: int, *,
                   split_segment: bool = False) -> dict[str, tuple[int, int]]:
    """The default token groups around a corrupted ``segment`` of a prompt of ``n_pos`` tokens.

    >>> default_groups((2, 4), 7)
    {'early context': (0, 2), 'segment': (2, 4), 'late context': (4, 6), 'last token': (6, 7)}
    >>> default_groups((0, 5), 5, split_segment=True)
    {'segment first': (0, 1), 'segment middle': (1, 3), 'segment last': (3, 4), 'last token': (4, 5)}
    """
    s, e = segment
    if not 0 <= s < e <= n_pos:
        raise InputError(f"segment ({s}, {e}) is not a non-empty span inside {n_pos} tokens")
    last = n_pos - 1
    seg_end = min(e, last)  # the last token is always its own group
    out: dict[str, tuple[int, int]] = {}
    if s > 0:
        out["early context"] = (0, s)
    if seg_end > s:
        if split_segment and seg_end - s >= 2:
            out["segment first"] = (s, s + 1)
            if seg_end - s >= 3:
                out["segment middle"] = (s + 1, seg_end - 1)
            out["segment last"] = (seg_end - 1, seg_end)
        else:
            out["segment"] = (s, seg_end)
    if last > e:
        out["late context"] = (e, last)
    out["last token"] = (last, n_pos)
    return out


def _decoded(model: Model, ids: Tensor) -> list[str] | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    return [str(tok.decode([int(i)])) for i in ids]


def resolve_groups(model: Model, tokens: Tensor, groups: Mapping[str, GroupSpec]) -> dict[str, tuple[int, int]]:
    """Token spans of named groups, checked: non-empty, inside the prompt, pairwise disjoint.

    Raises:
        InputError: no groups, a bad name, an empty or out-of-range span, a substring not in the
            prompt (or text on a model without a tokenizer), or two overlapping groups.
    """
    if not isinstance(groups, Mapping) or not groups:
        raise InputError("groups must be a non-empty dict {name: (start, end) or text}; or pass "
                         "groups=None for the default partition")  # fmt: skip
    n = int(tokens.numel())
    pieces: list[str] | None = None
    out: dict[str, tuple[int, int]] = {}
    for name, spec in groups.items():
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"group names must be non-empty strings, got {name!r}")
        if isinstance(spec, str):
            if not spec:
                raise InputError(f"group {name!r} is the empty string; give its text or a "
                                 "(start, end) token span")  # fmt: skip
            if pieces is None:
                pieces = _decoded(model, tokens)
                if pieces is None:
                    raise InputError(f"group {name!r} is text but this model has no tokenizer; "
                                     "give a (start, end) token span")  # fmt: skip
            out[name] = text_span(pieces, spec, f"group {name!r}: {spec!r}")
            continue
        if not (isinstance(spec, tuple | list) and len(spec) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in spec)):
            raise InputError(f"group {name!r} must be a (start, end) token span or a substring of "
                             f"the prompt, got {spec!r}")  # fmt: skip
        start, end = int(spec[0]), int(spec[1])
        if start >= end:
            raise InputError(f"group {name!r} = ({start}, {end}) is empty; spans are (start, end) "
                             f"with end exclusive, e.g. ({start}, {start + 1}) for one token")  # fmt: skip
        if start < 0 or end > n:
            raise InputError(f"group {name!r} = ({start}, {end}) falls outside the prompt's {n} "
                             f"tokens; use 0 <= start < end <= {n}")  # fmt: skip
        out[name] = (start, end)
    names = sorted(out, key=lambda k: out[k])
    for a, b in zip(names, names[1:], strict=False):
        if out[b][0] < out[a][1]:
            raise InputError(f"groups {a!r} {out[a]} and {b!r} {out[b]} overlap; make the spans "
                             "disjoint (end is exclusive)")  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# the result

_COLORSCALE = "RdBu"


@dataclass(frozen=True, kw_only=True, eq=False)
class FCCTResult(Result):
    """One prompt's fine-grained causal trace.

    Attributes:
        scores: ``[component, group, layer]`` recovery rate RR.
        p_patched: ``[component, group, layer]`` mean ``p(target)`` over the noisy rows with the
            clean component restored at every position of the group, at that layer.
        components: component names, in the order of ``scores``' first axis.
        groups: group name -> ``(start, end)`` token span, in the order of the second axis.
        tokens: token labels; token_ids: the prompt's ids.
        segment: ``(start, end)`` token span of the corrupted segment.
        target, target_token: the answer id and its label.
        p_clean, p_corrupt: ``p(target)`` of the clean run and (mean) of the noisy rows.
        samples, noise, sigma: the corruption (``nu = noise * sigma``).
        n_skipped: restores that were exact no-ops (RR exactly 0); work: counts of the run.
    """

    kind = "fcct"
    scores: Float[Tensor, "component group layer"]
    p_patched: Float[Tensor, "component group layer"]
    components: tuple[str, ...]
    groups: dict[str, tuple[int, int]]
    tokens: Sequence[str]
    segment: tuple[int, int]
    target: int
    p_clean: float
    p_corrupt: float
    token_ids: tuple[int, ...] = ()
    target_token: str = ""
    samples: int = 10
    noise: float = 3.0
    sigma: float = math.nan
    n_skipped: int = 0
    work: Mapping[str, int | float | str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "components", tuple(self.components))
        object.__setattr__(self, "segment", tuple(self.segment))
        object.__setattr__(self, "groups", {k: tuple(v) for k, v in self.groups.items()})
        want = (len(self.components), len(self.groups))
        for name in ("scores", "p_patched"):
            t = getattr(self, name)
            if t.ndim != 3 or tuple(t.shape[:2]) != want or t.shape != self.scores.shape:
                raise InputError(f"{name} of shape {tuple(t.shape)} needs [component, group, layer] "
                                 f"with {want[0]} components and {want[1]} groups")  # fmt: skip

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(self.groups)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[2])

    @property
    def total_effect(self) -> float:
        """``p_clean - p_corrupt``."""
        return self.p_clean - self.p_corrupt

    def _index(self, component: str, group: str) -> tuple[int, int]:
        if component not in self.components:
            raise InputError(f"component {component!r} is not in this result; it has "
                             f"{list(self.components)}")  # fmt: skip
        if group not in self.groups:
            raise InputError(f"group {group!r} is not in this result; it has {list(self.groups)}")
        return self.components.index(component), self.group_names.index(group)

    def rr(self, component: str, group: str) -> Float[Tensor, " layer"]:
        """The recovery rate of one component and group, per layer."""
        c, g = self._index(component, group)
        return self.scores[c, g]

    def top_layers(self, component: str, group: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` layers of highest RR as ``(layer, rr)``, best first (NaN never; ties keep
        the lower layer first)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        rr = self.rr(component, group).double()
        order = torch.sort(rr, descending=True, stable=True).indices.tolist()
        return [(int(i), float(rr[i])) for i in order if not math.isnan(float(rr[i]))][:k]

    def to_frame(self) -> pd.DataFrame:
        rows = [{"component": c, "group": g, "layer": ly, "rr": float(self.scores[i, j, ly]),
                 "p_patched": float(self.p_patched[i, j, ly])}
                for i, c in enumerate(self.components) for j, g in enumerate(self.groups)
                for ly in range(self.n_layers)]  # fmt: skip
        return pd.DataFrame(rows, columns=["component", "group", "layer", "rr", "p_patched"])

    def figure(self) -> go.Figure:
        """One RR heatmap per component (a row each): y = group, x = layer; one colour scale
        centred on 0."""
        names = {"attn": "attention output", "mlp": "MLP output", "hidden": "hidden state"}
        labels = [f"{g} {s}-{e - 1}" if e - s > 1 else f"{g} {s}" for g, (s, e) in self.groups.items()]
        n = len(self.components)
        fig = make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.08 if n > 1 else 0.0,
                            subplot_titles=[names.get(c, c) for c in self.components])  # fmt: skip
        finite = self.scores[torch.isfinite(self.scores)].abs()
        bound = max(1.0, float(finite.max())) if finite.numel() else 1.0
        layers = list(range(self.n_layers))
        for i, c in enumerate(self.components):
            text = [[f"{names.get(c, c)}, {lab}, layer {ly}" for ly in layers] for lab in labels]
            fig.add_trace(go.Heatmap(
                z=self.scores[i].double().numpy(), x=layers, y=labels, text=text,
                customdata=self.p_patched[i].double().numpy(), zmin=-bound, zmax=bound, zmid=0.0,
                colorscale=_COLORSCALE, coloraxis=None, showscale=i == 0,
                hovertemplate="%{text}: RR %{z:.3g} (p %{customdata:.3g})<extra></extra>",
            ), row=i + 1, col=1)  # fmt: skip
            fig.update_yaxes(title_text="group", type="category", autorange="reversed",
                             row=i + 1, col=1)  # fmt: skip
            fig.update_xaxes(tickmode="linear", dtick=1, row=i + 1, col=1)
        fig.update_xaxes(title_text="layer", row=n, col=1)
        fig.update_layout(
            title=(f"recovery rate of p({self.target_token or self.target}): clean "
                   f"{self.p_clean:.3g}, corrupt {self.p_corrupt:.3g}"),
            height=max(300, 60 + n * (40 + 28 * len(labels))),
        )  # fmt: skip
        return fig


# ---------------------------------------------------------------------------------------------
# the analysis


def _labels(model: Model, ids: Tensor) -> tuple[str, ...]:
    try:
        pieces = _decoded(model, ids)
    except Exception:  # noqa: BLE001  (a tokenizer that cannot decode an id: show the id)
        pieces = None
    return tuple(pieces) if pieces is not None else tuple(str(int(i)) for i in ids)


def variants(components: Sequence[str], groups: Mapping[str, tuple[int, int]],
             n_layers: int) -> list[Variant]:
    """The restore variants of a trace, in ``[component, group, layer]`` order.

    >>> variants(["attn"], {"g": (1, 3)}, 2)
    [((('attn_out', 0, (1, 2)),), ()), ((('attn_out', 1, (1, 2)),), ())]
    """
    out: list[Variant] = []
    for c in components:
        for s, e in groups.values():
            for ly in range(n_layers):
                rest: tuple[Restore, ...] = ((COMPONENTS[c], ly, tuple(range(s, e))),)
                out.append((rest, ()))
    return out


def fine_grained_trace(
    model: Model,
    prompt: str | Sequence[int] | Tensor,
    subject_or_corrupt_span: str | tuple[int, int],
    groups: Mapping[str, GroupSpec] | None = None,
    components: Sequence[str] = ("attn", "mlp", "hidden"),
    samples: int = 10,
    noise: float = 3.0,
    sigma: float | None = None,
    seed: int = 0,
    target: str | int | None = None,
    max_bytes: int | None = None,
    progress: bool = True,
    *,
    split_segment: bool = False,
) -> FCCTResult:
    """Fine-grained causal trace of one prompt: RR of each component x token group x layer.

    Args:
        model: the model.
        prompt: text (needs a tokenizer) or token ids.
        subject_or_corrupt_span: the corrupted segment: its text (a substring of the prompt) or a
            ``(start, end)`` token span.
        groups: name -> ``(start, end)`` token span or substring; None: :func:`default_groups`.
        components: any of ``attn``, ``mlp``, ``hidden``, in the order of the result.
        samples: noisy rows N.
        noise: ``nu = noise * sigma``.
        sigma: embedding std (default: the std of the token-embedding matrix).
        seed: seed of the noise (the same samples for every restore).
        target: the answer token (text of one token, or an id); None: the clean top-1.
        max_bytes: memory budget of one batched forward.
        progress: a progress bar on stderr.
        split_segment: with the default groups, split the segment into first / middle / last.

    Returns:
        An :class:`FCCTResult` with ``scores[component, group, layer]`` = RR.

    Raises:
        InputError: bad prompt, segment, groups or options; a total effect too small to
            normalise by. HookNameError: ``mlp`` on an attention-only model.
    """
    cfg = FCCTConfig(components=tuple(components), samples=samples, noise=noise, sigma=sigma,
                     seed=seed, split_segment=split_segment, max_bytes=max_bytes,
                     progress=progress)  # fmt: skip
    n_layers = int(model.cfg.n_layers)
    for c in cfg.components:
        check_site_on_model(model, COMPONENTS[c], range(n_layers))
    setup = prepare_trace(model, prompt, subject_or_corrupt_span, target=target,
                          config=cfg.trace_config())  # fmt: skip
    n_pos = int(setup.tokens.numel())
    spans = (default_groups(setup.span, n_pos, split_segment=cfg.split_segment) if groups is None
             else resolve_groups(model, setup.tokens, groups))  # fmt: skip
    te = setup.p_clean - setup.p_corrupt
    if not abs(te) >= MIN_TOTAL_EFFECT:
        raise InputError(f"the corruption does not change p(target): p_clean = {setup.p_clean:.6g}, "
                         f"p_corrupt = {setup.p_corrupt:.6g} (total effect {te:.3g}, below "
                         f"{MIN_TOTAL_EFFECT:g}), so the recovery rate is undefined; raise noise= "
                         f"(now {cfg.noise}), corrupt a longer segment, or choose another "
                         "target=")  # fmt: skip
    probs, work = restore_probs(model, setup, variants(cfg.components, spans, n_layers),
                                max_bytes=cfg.max_bytes, progress=cfg.progress)  # fmt: skip
    p = torch.tensor(probs, dtype=torch.float64).view(len(cfg.components), len(spans), n_layers)
    rr = (p - setup.p_corrupt) / te
    config: dict[str, Any] = asdict(cfg)
    config["groups"] = {k: list(v) for k, v in spans.items()}
    return FCCTResult(
        provenance=Provenance.of(model, config, seed=seed), scores=rr, p_patched=p,
        components=cfg.components, groups=spans, tokens=_labels(model, setup.tokens),
        token_ids=tuple(int(i) for i in setup.tokens), segment=setup.span, target=setup.target,
        target_token=_labels(model, torch.tensor([setup.target]))[0], p_clean=setup.p_clean,
        p_corrupt=setup.p_corrupt, samples=cfg.samples, noise=float(cfg.noise), sigma=setup.sigma,
        n_skipped=int(work["skipped"]), work=dict(work),
    )  # fmt: skip
