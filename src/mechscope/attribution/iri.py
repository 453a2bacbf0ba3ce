"""Representation injection (IRI): add the outputs of the layers FCCT found important to later ones.

Method ("Causal Tracing of Object Representations in LVLMs", 2025, no public code; METHODS.md §1).
From a fine-grained causal trace (:func:`mechscope.attribution.fcct.fine_grained_trace`) of the
last-token group:

- sources: the ``k1`` layers of highest recovery rate RR, separately for the attention output
  (``attn_out``) and the MLP output (``mlp_out``);
- targets: ``k2`` layers. The paper does not pin them down; here they are the ``k2`` layers
  right after the earliest source layer of that component (``s0 + 1 .. s0 + k2``), clipped to
  the model, so every target has at least one source below it;
- at a target layer ``l``, at the last position only, in the same forward pass:
  ``a~(l) = a(l) + lambda_a * sum_{source k < l} RR_attn[k] * a(k)``, then rescaled to the norm of
  the original, ``a~(l) * ||a(l)|| / ||a~(l)||`` (per row; norms over ``d_model``). The same for
  the MLP output with ``lambda_m`` and ``RR_mlp``.

``a(k)`` is the value layer ``k`` produced in the same forward before its own injection (a layer
can be a source and a target). Sources at or above the target never contribute. The paper's
defaults: ``k1 = 3``, ``k2 = 10``, ``lambda_a = 0.26``, ``lambda_m = 0.16`` (LLaVA-1.5).

Hooks are attached only through :func:`mechscope.probes.intervene`: one
:class:`~mechscope.probes.Apply` per (site, layer) that first injects (targets) and then records
(sources); the records live only for the ``with`` block of :func:`inject`.

Positions: the last position of every row (``position=-1``) for unpadded or equal-length rows;
for right-padded batches give ``lengths`` (each row's real length; the injection goes at
``lengths - 1``) or ``position`` as a ``[batch]`` tensor of absolute positions.

Caveats: RR weights come from one traced prompt (average traces for a robust plan); a negative
RR at a source layer subtracts that layer's output. ``lambda = 0`` is the identity bit for bit
(nothing is attached). A target whose output is zero at the injected position is left unchanged
(no norm to rescale to). Half-precision activations are injected in float32 and rounded back, so
their norms are kept to the dtype's precision only.

>>> import torch
>>> from mechscope.models import load
>>> m = load("native:n_layers=3,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> plan = IRIPlan(n_layers=3, attn=InjectionSpec(site="attn_out", sources=(0,), weights=(0.8,),
...                targets=(1, 2), strength=0.26))
>>> tokens = torch.tensor([[1, 2, 3, 4]])
>>> base = m(tokens)
>>> with inject(m, plan):
...     injected = m(tokens)
>>> torch.equal(injected[:, :-1], base[:, :-1]), torch.equal(injected[:, -1], base[:, -1])
(True, False)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechscope import metrics
from mechscope.attribution.fcct import COMPONENTS, FCCTResult
from mechscope.errors import InputError
from mechscope.probes import Apply, intervene
from mechscope.probes.interventions import Intervention
from mechscope.probes.sites import check_site_on_model
from mechscope.tasks.base import TaskBatch, pad_id, right_pad
from mechscope.types import Model

__all__ = ["IRIConfig", "IRIEvaluation", "IRIPlan", "InjectionSpec", "evaluate_iri", "inject",
           "iri_plan"]  # fmt: skip

_SITES = ("attn_out", "mlp_out")


def _number(value: Any, name: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0 ({hint}), got {value!r}")
    return float(value)


def _layers(value: Any, name: str) -> tuple[int, ...]:
    out = tuple(value)
    if any(isinstance(x, bool) or not isinstance(x, int) for x in out) or len(set(out)) != len(out):
        raise InputError(f"{name} must be distinct int layers, got {value!r}")
    return out


@dataclass(frozen=True, kw_only=True)
class InjectionSpec:
    """The injection into one site: ``a~(l) = a(l) + strength * sum_{k in sources, k < l}
    weight_k * a(k)`` at each target ``l``, rescaled to ``||a(l)||``.

    Attributes:
        site: ``attn_out`` or ``mlp_out``.
        sources: source layers; weights: their weights (the RR), one per source.
        targets: target layers.
        strength: lambda (``lambda_a`` for attention, ``lambda_m`` for MLPs), >= 0.
    """

    site: str
    sources: tuple[int, ...]
    weights: tuple[float, ...]
    targets: tuple[int, ...]
    strength: float

    def __post_init__(self) -> None:
        if self.site not in _SITES:
            raise InputError(f"site must be 'attn_out' or 'mlp_out', got {self.site!r}")
        object.__setattr__(self, "sources", _layers(self.sources, "sources"))
        object.__setattr__(self, "targets", _layers(self.targets, "targets"))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.sources or not self.targets:
            raise InputError(f"an injection into {self.site} needs at least one source and one "
                             f"target layer, got sources={self.sources}, targets={self.targets}")  # fmt: skip
        if len(self.weights) != len(self.sources) or not all(math.isfinite(w) for w in self.weights):
            raise InputError(f"weights must be one finite number per source layer ({len(self.sources)}), "
                             f"got {self.weights}")  # fmt: skip
        object.__setattr__(self, "strength", _number(self.strength, "strength", "the paper: 0.26 "
                                                     "for attention, 0.16 for MLPs"))  # fmt: skip

    def sources_below(self, layer: int) -> list[tuple[int, float]]:
        """``(source, weight)`` of the sources that feed target ``layer`` (those below it)."""
        return [(k, w) for k, w in zip(self.sources, self.weights, strict=True) if k < layer]


@dataclass(frozen=True, kw_only=True)
class IRIConfig:
    """Options of :func:`iri_plan` (the paper's defaults)."""

    k1: int = 3
    k2: int = 10
    lambda_a: float = 0.26
    lambda_m: float = 0.16
    group: str = "last token"
    components: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("k1", "k2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an int >= 1 (the paper: k1=3 source layers, "
                                 f"k2=10 target layers), got {v!r}")  # fmt: skip
        _number(self.lambda_a, "lambda_a", "the paper: 0.26")
        _number(self.lambda_m, "lambda_m", "the paper: 0.16")
        if self.components is not None:
            comps = (self.components,) if isinstance(self.components, str) else tuple(self.components)
            if not comps or any(c not in ("attn", "mlp") for c in comps) or len(set(comps)) != len(comps):
                raise InputError(f"components must be distinct names from ('attn', 'mlp'), got "
                                 f"{self.components!r}")  # fmt: skip
            object.__setattr__(self, "components", comps)


@dataclass(frozen=True, kw_only=True)
class IRIPlan:
    """What :func:`inject` does: an injection into the attention and/or the MLP outputs.

    Attributes:
        n_layers: layers of the model the plan was made for (checked by :func:`inject`).
        attn: the injection into ``attn_out`` (None: none).
        mlp: the injection into ``mlp_out`` (None: none).
        group: the FCCT group the weights came from.
    """

    n_layers: int
    attn: InjectionSpec | None = None
    mlp: InjectionSpec | None = None
    group: str = "last token"

    def __post_init__(self) -> None:
        if self.attn is None and self.mlp is None:
            raise InputError("an IRI plan needs an attention or an MLP injection (attn= or mlp=)")
        for name, spec, site in (("attn", self.attn, "attn_out"), ("mlp", self.mlp, "mlp_out")):
            if spec is None:
                continue
            if spec.site != site:
                raise InputError(f"{name}= must inject into {site!r}, got site={spec.site!r}")
            bad = [ly for ly in (*spec.sources, *spec.targets) if not 0 <= ly < self.n_layers]
            if bad:
                raise InputError(f"{name} layers {bad} fall outside the model's {self.n_layers} "
                                 f"layers (0..{self.n_layers - 1})")  # fmt: skip

    @property
    def specs(self) -> tuple[InjectionSpec, ...]:
        return tuple(s for s in (self.attn, self.mlp) if s is not None)


def iri_plan(result: FCCTResult, *, k1: int = 3, k2: int = 10, lambda_a: float = 0.26,
             lambda_m: float = 0.16, group: str = "last token",
             components: Sequence[str] | None = None) -> IRIPlan:
    """The injection plan from a fine-grained causal trace.

    Sources: the ``k1`` layers of highest RR of ``group`` (per component); weights: their RR;
    targets: the ``k2`` layers after the earliest source, clipped to the model.

    Args:
        result: a :class:`~mechscope.attribution.fcct.FCCTResult` with the ``attn`` and/or
            ``mlp`` component and the group.
        k1, k2: source and target layer counts (``k1`` is capped at the model's layers).
        lambda_a, lambda_m: injection strengths for attention and MLP outputs.
        group: the FCCT group whose RR picks the sources (the paper: the last token).
        components: ``("attn",)``, ``("mlp",)`` or both; None: those of ``attn``/``mlp`` the
            result has.

    Raises:
        InputError: bad options, an unknown group, a component the result lacks, or a source
            set with no layer above it to inject into.
    """
    cfg = IRIConfig(k1=k1, k2=k2, lambda_a=lambda_a, lambda_m=lambda_m, group=group,
                    components=None if components is None else tuple(components))  # fmt: skip
    if not isinstance(result, FCCTResult):
        raise InputError(f"iri_plan needs an FCCTResult (from fine_grained_trace), got "
                         f"{type(result).__name__}")  # fmt: skip
    if cfg.group not in result.groups:
        raise InputError(f"group {cfg.group!r} is not in the trace; it has {list(result.groups)} "
                         "(pass group=...)")  # fmt: skip
    comps = cfg.components or tuple(c for c in ("attn", "mlp") if c in result.components)
    if not comps:
        raise InputError(f"the trace has no 'attn' or 'mlp' component (it has "
                         f"{list(result.components)}); trace with components=('attn', 'mlp')")  # fmt: skip
    missing = [c for c in comps if c not in result.components]
    if missing:
        raise InputError(f"the trace has no {missing} component (it has {list(result.components)}); "
                         f"trace them with fine_grained_trace(components=...), or plan with "
                         f"components={tuple(c for c in comps if c in result.components)}")  # fmt: skip
    n_layers = result.n_layers
    specs: dict[str, InjectionSpec] = {}
    for c in comps:
        top = result.top_layers(c, cfg.group, min(cfg.k1, n_layers))
        if not top:
            raise InputError(f"RR of {c} at {cfg.group!r} is NaN at every layer; re-run the trace")
        first = min(ly for ly, _ in top)
        targets = tuple(range(first + 1, min(n_layers, first + 1 + cfg.k2)))
        if not targets:
            raise InputError(f"the {c} source layers {[ly for ly, _ in top]} leave no layer above "
                             f"the earliest ({first}) to inject into (the model has {n_layers}); "
                             "raise k1 to include earlier layers")  # fmt: skip
        specs[c] = InjectionSpec(site=COMPONENTS[c], sources=tuple(ly for ly, _ in top),
                                 weights=tuple(w for _, w in top), targets=targets,
                                 strength=cfg.lambda_a if c == "attn" else cfg.lambda_m)  # fmt: skip
    return IRIPlan(n_layers=n_layers, attn=specs.get("attn"), mlp=specs.get("mlp"), group=cfg.group)


# ---------------------------------------------------------------------------------------------
# the injection


def _layer_fn(spec: InjectionSpec, layer: int, store: dict[int, Tensor]) -> Callable[[Tensor], Tensor]:
    """The function of one (site, layer): inject if a target (from the sources below, recorded
    earlier in this forward), then record if a source (the value before the injection)."""
    below = spec.sources_below(layer) if layer in spec.targets else []
    is_source = layer in spec.sources

    def fn(act: Tensor) -> Tensor:
        out = act
        if below:
            work = act.float() if act.dtype in (torch.float16, torch.bfloat16) else act
            total = torch.zeros_like(work)
            for k, w in below:
                total = total + w * store[k].to(work.dtype)
            new = work + spec.strength * total
            norm_old = work.norm(dim=-1, keepdim=True)
            norm_new = new.norm(dim=-1, keepdim=True)
            scaled = new * (norm_old / norm_new.clamp_min(torch.finfo(work.dtype).tiny))
            out = torch.where(norm_new > 0, scaled, work).to(act.dtype)
        if is_source:
            store[layer] = act
        return out

    return fn


def _positions(position: int | Tensor, lengths: Tensor | None) -> tuple[int, ...] | Tensor:
    if lengths is not None:
        if not (isinstance(position, int) and position == -1):
            raise InputError("give either lengths= (inject at each row's last real token) or "
                             "position=, not both")  # fmt: skip
        lengths = torch.as_tensor(lengths)
        if lengths.ndim != 1 or lengths.dtype.is_floating_point or bool((lengths < 1).any()):
            raise InputError(f"lengths must be a [batch] tensor of ints >= 1, got {lengths!r}")
        return (lengths.long() - 1)[:, None]
    if isinstance(position, Tensor):
        if position.ndim != 1 or position.dtype.is_floating_point:
            raise InputError(f"position as a tensor must be [batch] integer positions, got "
                             f"{position.dtype} {tuple(position.shape)}")  # fmt: skip
        return position.long()[:, None]
    if isinstance(position, bool) or not isinstance(position, int):
        raise InputError(f"position must be an int (-1: the last) or a [batch] tensor, got {position!r}")
    return (position,)


def injection_specs(model: Model, plan: IRIPlan, *, position: int | Tensor = -1,
                    lengths: Tensor | None = None,
                    store: dict[str, dict[int, Tensor]] | None = None) -> list[Intervention]:
    """The :class:`~mechscope.probes.Apply` specs of a plan, in layer order (what :func:`inject`
    attaches). ``store`` receives the recorded source values (``site -> {layer: act}``)."""
    if not isinstance(plan, IRIPlan):
        raise InputError(f"inject needs an IRIPlan (from iri_plan), got {type(plan).__name__}")
    n_layers = int(model.cfg.n_layers)
    if plan.n_layers != n_layers:
        raise InputError(f"the plan is for a model of {plan.n_layers} layers; this one has "
                         f"{n_layers}: make the plan from a trace of this model")  # fmt: skip
    pos = _positions(position, lengths)
    store = {} if store is None else store
    out: list[Intervention] = []
    for spec in plan.specs:
        check_site_on_model(model, spec.site, range(n_layers))
        if spec.strength == 0.0:
            continue  # the identity: attach nothing
        seen = store.setdefault(spec.site, {})
        for layer in sorted(set(spec.sources) | set(spec.targets)):
            if layer in spec.sources or spec.sources_below(layer):
                out.append(Apply(site=spec.site, layer=layer, positions=pos,
                                 fn=_layer_fn(spec, layer, seen)))  # fmt: skip
    return out


@contextmanager
def inject(model: Model, plan: IRIPlan, *, position: int | Tensor = -1,
           lengths: Tensor | None = None) -> Iterator[Model]:
    """Apply an IRI plan to every forward of ``model`` inside the ``with`` block.

    Args:
        model: the model the plan was made for.
        plan: from :func:`iri_plan` (or built by hand).
        position: the position injected: an int shared by every row (-1: the last; rows must
            then be unpadded or of equal length), or a ``[batch]`` tensor of absolute positions.
        lengths: the real length of each row of a right-padded batch: inject at ``lengths - 1``.

    Raises:
        InputError: a plan for another model, bad positions; HookNameError: an MLP injection on
            an attention-only model.
    """
    store: dict[str, dict[int, Tensor]] = {}
    specs = injection_specs(model, plan, position=position, lengths=lengths, store=store)
    try:
        with intervene(model, specs):
            yield model
    finally:
        store.clear()


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True, kw_only=True)
class IRIEvaluation:
    """A task metric with and without the injection, on the same prompts.

    Attributes:
        metric: ``prob``, ``logprob`` or ``logit_diff`` (mean over prompts).
        base, injected: the metric without / with the injection; difference: injected - base.
        accuracy_base, accuracy_injected: top-1 accuracy of the answer at the scored position.
        n: prompts evaluated.
    """

    metric: str
    base: float
    injected: float
    difference: float
    accuracy_base: float
    accuracy_injected: float
    n: int


def _to_batch(model: Model, data: TaskBatch | Sequence[tuple[Any, Any]]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """tokens, lengths, answers, wrong answers (None for prompt pairs)."""
    if isinstance(data, TaskBatch):
        if not bool((data.answer_pos == data.real_lengths - 1).all()):
            raise InputError("IRI injects at each row's last real token, so answer_pos must be "
                             "lengths - 1 for every row of the task batch")  # fmt: skip
        return data.clean, data.real_lengths, data.answer, data.corrupt_answer
    pairs = list(data)
    if not pairs:
        raise InputError("no prompts to evaluate; give a TaskBatch or a list of (prompt, target)")
    rows: list[list[int]] = []
    answers: list[int] = []
    tok = getattr(model, "tokenizer", None)
    vocab = int(model.cfg.d_vocab)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise InputError(f"item {i} must be a (prompt, target) pair, got {pair!r}")
        prompt, target = pair
        if isinstance(prompt, str):
            if tok is None or not prompt.strip():
                raise InputError(f"prompt {i} is text but the model has no tokenizer (or it is "
                                 "empty); give token ids")  # fmt: skip
            ids = [int(t) for t in model.to_tokens(prompt, truncate=False, move_to_device=False)[0]]
        else:
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
        if not ids or len(ids) > int(model.cfg.n_ctx) or min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt {i} must have 1..{int(model.cfg.n_ctx)} token ids in "
                             f"0..{vocab - 1}, got {ids}")  # fmt: skip
        if isinstance(target, str):
            if tok is None:
                raise InputError(f"target {i} is text but the model has no tokenizer; give its id")
            t_ids = tok(target, add_special_tokens=False)["input_ids"]
            if len(t_ids) != 1:
                raise InputError(f"target {target!r} is {len(t_ids)} tokens; give one token "
                                 "(often with a leading space) or its id")  # fmt: skip
            target = int(t_ids[0])
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < vocab:
            raise InputError(f"target {i} must be one token id in 0..{vocab - 1}, got {target!r}")
        rows.append(ids)
        answers.append(target)
    lengths = torch.tensor([len(r) for r in rows])
    return right_pad(rows, pad_id(model)), lengths, torch.tensor(answers), None


@torch.no_grad()
def _logits(model: Model, tokens: Tensor, lengths: Tensor) -> Tensor:
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {}
    if bool((lengths < tokens.shape[1]).any()):
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        kwargs["attention_mask"] = mask.long().to(device)
    return model(tokens.to(device), **kwargs)


def evaluate_iri(model: Model, plan: IRIPlan, data: TaskBatch | Sequence[tuple[Any, Any]], *,
                 metric: str = "prob", batch_size: int = 32) -> IRIEvaluation:
    """The task metric on held-out prompts, without and with the injection.

    Args:
        model: the model.
        plan: the IRI plan.
        data: a :class:`~mechscope.tasks.TaskBatch` (its clean rows, scored at ``answer_pos``,
            which must be each row's last real token) or ``(prompt, target)`` pairs (text or ids;
            right-padded and scored at each prompt's last token).
        metric: ``prob`` (mean p(answer)), ``logprob`` or ``logit_diff`` (TaskBatch only).
        batch_size: rows per forward.
    """
    if metric not in ("prob", "logprob", "logit_diff"):
        raise InputError(f"metric must be 'prob', 'logprob' or 'logit_diff', got {metric!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    tokens, lengths, answer, wrong = _to_batch(model, data)
    if metric == "logit_diff" and wrong is None:
        raise InputError("metric='logit_diff' needs a TaskBatch (its corrupt answers); use 'prob'")
    injection_specs(model, plan, lengths=lengths)  # check the plan before any forward
    sums = {"base": 0.0, "injected": 0.0, "acc_base": 0.0, "acc_injected": 0.0}
    for at in range(0, tokens.shape[0], batch_size):
        sl = slice(at, at + batch_size)
        lens = lengths[sl]
        toks = tokens[sl, : int(lens.max())]
        pos = lens - 1
        ans = answer[sl]
        for name in ("base", "injected"):
            if name == "base":
                logits = _logits(model, toks, lens)
            else:
                with inject(model, plan, lengths=lens):
                    logits = _logits(model, toks, lens)
            logits = logits.cpu()
            if metric == "prob":
                values = metrics.answer_prob(logits, ans, pos)
            elif metric == "logprob":
                values = metrics.answer_logprob(logits, ans, pos)
            else:
                assert wrong is not None
                values = metrics.logit_diff(logits, ans, wrong[sl], pos)
            top = metrics.answer_logits(logits, pos).argmax(-1)
            sums[name] += float(values.double().sum())
            sums[f"acc_{name}"] += float((top == ans).double().sum())
    n = int(tokens.shape[0])
    base, injected = sums["base"] / n, sums["injected"] / n
    return IRIEvaluation(metric=metric, base=base, injected=injected, difference=injected - base,
                         accuracy_base=sums["acc_base"] / n,
                         accuracy_injected=sums["acc_injected"] / n, n=n)  # fmt: skip
