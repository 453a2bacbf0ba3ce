"""Causal tracing (ROME): which hidden states, MLPs or attention layers carry a fact.

Method (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", code kmeng01/rome,
``experiments/causal_trace.py``; METHODS.md §1). One prompt, a subject span, an answer token:

1. clean run: ``p_clean = p(target)`` at the last position;
2. corrupted run: ``samples = N`` copies of the prompt with Gaussian noise ``nu * eps`` added to
   the *token* embeddings (``hook_embed``: before positional embeddings; on rotary models the
   whole input) of the subject positions, ``nu = noise * sigma``; ``p_corrupt`` = the mean over
   the N rows. The noise is drawn once from ``subject_noise(N, n_subject, d_model, seed=seed)``
   (ROME's layout: the k-th subject token gets sample k), so every restore below sees the same
   noise (common random numbers);
3. for every token ``t`` and layer ``l``, restore the clean value into the N noisy rows and
   re-measure: ``kind="hidden"`` restores the block output (``resid`` = ``hook_resid_post``) at
   ``(t, l)``; ``"mlp"``/``"attn"`` restore ``mlp_out``/``attn_out`` at ``t`` in the layers
   :func:`window_layers` (ROME: ``l-5 .. l+4`` for ``window=10``, clipped to the model).
   Indirect effect ``IE = p_patched - p_corrupt``, total effect ``TE = p_clean - p_corrupt``.
4. ``severed="mlp"`` (or ``"attn"``; hidden only) restores the hidden state at ``(t, l)`` while
   the MLP (attention) outputs of every layer above ``l``, at every position, are frozen at their
   corrupted values (ROME freezes all layers; those at or below ``l`` are corrupted anyway or
   overwritten by the restore, so this is the same). What is left is the restored state's effect
   that does not go through later MLPs (attention).

Batching: V (token, layer) variants x N noisy rows run in one forward (V*N rows, chunked under
the memory budget), one :class:`~mechscope.probes.Apply` per (site, layer) whose mask selects each
variant's own rows, through :func:`~mechscope.probes.intervene`; the noise is one writer on
``hook_embed`` through :func:`~mechscope.probes.hooks.hooked`. A restore that writes values equal
bit for bit to the corrupted ones (positions before the subject) is an exact no-op: its score is
``p_corrupt`` and it is counted in ``n_skipped``. Probabilities are averaged in float64.

``sigma`` (default): the std of all entries of the token-embedding matrix ``W_E``, the same for
every prompt of a model. ROME uses the std of the token embeddings of its dataset's subjects:
compute that with :func:`subject_embedding_std` and pass ``sigma=``.

Caveats: one prompt, one answer token; IE depends on ``noise``/``sigma`` (too little noise leaves
nothing to restore, ``TE`` small); with ``samples`` small the corrupted run is a noisy estimate.

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> r = causal_trace(model, [1, 2, 3, 4, 5], (1, 3), samples=3, progress=False)
>>> r.scores.shape, r.indirect_effect.shape
(torch.Size([2, 5]), torch.Size([2, 5]))
>>> float(causal_trace(model, [1, 2, 3, 4, 5], (1, 3), noise=0.0, progress=False).indirect_effect.abs().max())
0.0
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechscope.attribution.causal_trace_result import (
    AggregateTrace,
    CausalTraceResult,
    aggregate_traces,
)
from mechscope.attribution.engine import SITE_STAGE, STAGES, Engine, Plan, RunCache, Write, agrees
from mechscope.attribution.prompts import _embedding_matrix, _prompt_ids, _subject_span, _target_id
from mechscope.errors import HookNameError, InputError
from mechscope.kernels.noise import add_subject_noise, subject_noise
from mechscope.probes import Apply, Tracer, intervene
from mechscope.probes import budget as _budget
from mechscope.probes.hooks import hooked
from mechscope.probes.interventions import Intervention
from mechscope.probes.sites import check_site_on_model
from mechscope.results import Provenance
from mechscope.types import Model

__all__ = ["AggregateTrace", "CausalTraceConfig", "CausalTraceResult", "Restore", "TraceSetup",
           "aggregate_traces", "causal_trace", "prepare_trace", "restore_probs",
           "subject_embedding_std", "window_layers"]  # fmt: skip

KINDS = {"hidden": "resid", "mlp": "mlp_out", "attn": "attn_out"}
EMBED_HOOK = "hook_embed"

#: One restore of a variant: (site, layer, positions) written from the clean run.
Restore = tuple[str, int, tuple[int, ...]]
#: A variant: what is restored from the clean run, and which (site, layer) are frozen (all
#: positions) at the corrupted run's values.
Variant = tuple[tuple[Restore, ...], tuple[tuple[str, int], ...]]


@dataclass(frozen=True, kw_only=True)
class CausalTraceConfig:
    """Options of :func:`causal_trace`.

    Attributes:
        kind: ``hidden`` (block outputs), ``mlp`` or ``attn`` (outputs, over a window of layers).
        window: layers restored together for ``mlp``/``attn`` (ROME: 10, i.e. ``l-5 .. l+4``).
        samples: noisy rows N.
        noise: the noise multiplier: ``nu = noise * sigma`` (ROME: 3).
        sigma: the embedding std; None: the std of the whole token-embedding matrix.
        seed: seed of the noise samples (common random numbers for every restore).
        severed: None, ``mlp`` or ``attn``: freeze those outputs above the restored layer at
            their corrupted values (``kind="hidden"`` only).
        max_bytes: memory budget of one batched forward; None: the tracer's default.
        engine: ``auto`` (the engine of :mod:`mechscope.attribution.engine`, which runs each
            restore from its layer and position only, where it knows the model and agrees with
            the bridge; else hooks), ``engine`` (required) or ``hooks``.
        progress: a tqdm bar on stderr.
    """

    kind: str = "hidden"
    window: int = 10
    samples: int = 10
    noise: float = 3.0
    sigma: float | None = None
    seed: int = 0
    severed: str | None = None
    max_bytes: int | None = None
    engine: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "engine", "hooks"):
            raise InputError(f"engine must be 'auto', 'engine' or 'hooks', got {self.engine!r}")
        if self.kind not in KINDS:
            raise InputError(f"kind must be 'hidden', 'mlp' or 'attn', got {self.kind!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise InputError(f"window must be a positive int (ROME: 10), got {self.window!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise InputError(f"samples must be a positive int (ROME: 10), got {self.samples!r}")
        if not (isinstance(self.noise, int | float) and math.isfinite(self.noise) and self.noise >= 0):
            raise InputError(f"noise must be a finite number >= 0 (ROME: 3), got {self.noise!r}")
        if self.sigma is not None and not (isinstance(self.sigma, int | float)
                                           and math.isfinite(self.sigma) and self.sigma > 0):
            raise InputError(f"sigma must be a positive finite number or None, got {self.sigma!r}")
        if self.severed not in (None, "mlp", "attn"):
            raise InputError(f"severed must be None, 'mlp' or 'attn', got {self.severed!r}")
        if self.severed is not None and self.kind != "hidden":
            raise InputError(f"severed={self.severed!r} freezes outputs while restoring hidden "
                             f"states; use kind='hidden' (got kind={self.kind!r})")  # fmt: skip
        if self.max_bytes is not None and self.max_bytes < 1:
            raise InputError(f"max_bytes must be a positive number of bytes, got {self.max_bytes}")


def window_layers(layer: int, n_layers: int, window: int) -> tuple[int, ...]:
    """The layers restored together around ``layer`` (ROME's ``l - w//2 .. l + w - w//2 - 1``,
    clipped to ``0 .. n_layers - 1``).

    >>> window_layers(0, 12, 10), window_layers(7, 12, 10)
    ((0, 1, 2, 3, 4), (2, 3, 4, 5, 6, 7, 8, 9, 10, 11))
    """
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2)))


# ---------------------------------------------------------------------------------------------
# inputs


def subject_embedding_std(model: Model, subjects: Sequence[Sequence[int]]) -> float:
    """ROME's sigma: the std of every entry of the token embeddings of the given subjects' tokens.

    >>> from mechscope.models import load
    >>> m = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
    >>> subject_embedding_std(m, [[1, 2], [3]]) > 0
    True
    """
    ids = [int(i) for s in subjects for i in s]
    if not ids:
        raise InputError("no subject tokens given; pass lists of token ids, one per subject")
    return float(_embedding_matrix(model)[torch.tensor(ids)].float().std())


# ---------------------------------------------------------------------------------------------
# the traced runs


@dataclass(frozen=True, kw_only=True, eq=False)
class TraceSetup:
    """Everything :func:`restore_probs` needs: the prompt, noise, and the two traced runs.

    ``clean[key]`` is ``[1, pos, d_model]``, ``corrupt[key]`` ``[N, pos, d_model]`` for keys
    ``"<site>.<layer>"`` of ``resid``, ``attn_out`` and (models with MLPs) ``mlp_out``.
    """

    tokens: Int[Tensor, " pos"]
    span: tuple[int, int]
    target: int
    sigma: float
    nu: float
    noise: Float[Tensor, "samples n_subject d_model"]
    clean: dict[str, Tensor]
    corrupt: dict[str, Tensor]
    p_clean: float
    p_corrupt: float
    engine: Engine | None = None  # the patching engine, when it runs this model
    cache: RunCache | None = None  # its run of the clean row (0) and the N noisy rows (1..N)
    engine_why_not: str | None = None

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])

    def mask(self) -> Tensor:
        m = torch.zeros(self.tokens.numel(), dtype=torch.bool)
        m[self.span[0] : self.span[1]] = True
        return m


def _noise_writer(setup: TraceSetup, first_clean: bool) -> Callable[..., Tensor]:
    """``hook_embed`` writer: noise on the subject positions of every row (but row 0 when
    ``first_clean``); the rows are groups of N, row r of a group gets sample r."""

    def fn(act: Tensor, hook: Any) -> Tensor:
        n = setup.samples
        rows = act[1:] if first_clean else act
        noise = setup.noise.to(act.device).repeat(rows.shape[0] // n, 1, 1)
        noisy = add_subject_noise(rows, noise, setup.mask().to(act.device), setup.nu)
        return torch.cat([act[:1], noisy]) if first_clean else noisy

    return fn


def _probs(logits: Tensor, target: int) -> Tensor:
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, target].double()


@torch.no_grad()
def prepare_trace(model: Model, prompt: str | Sequence[int] | Tensor, subject: str | tuple[int, int],
                  *, target: str | int | None = None, config: CausalTraceConfig | None = None) -> TraceSetup:
    """Check the inputs and run the clean + N noisy rows once (one forward), traced."""
    cfg = config or CausalTraceConfig()
    ids = _prompt_ids(model, prompt)
    span = _subject_span(model, ids, subject)
    tgt = _target_id(model, target)
    if cfg.kind == "mlp" or cfg.severed == "mlp":
        check_site_on_model(model, "mlp_out", range(int(model.cfg.n_layers)))
    try:
        model.hook_dict[EMBED_HOOK]
    except KeyError:
        raise HookNameError(f"the model has no {EMBED_HOOK!r} hook (the token embedding); "
                            "causal tracing needs it") from None  # fmt: skip
    sigma = float(cfg.sigma) if cfg.sigma is not None else float(_embedding_matrix(model).float().std())
    n, d = cfg.samples, int(model.cfg.d_model)
    noise = subject_noise(n, span[1] - span[0], d, seed=cfg.seed)
    sites = ("resid", "attn_out") if getattr(model.cfg, "attn_only", False) else ("resid", "attn_out", "mlp_out")
    device = next(model.parameters()).device
    setup = TraceSetup(tokens=ids, span=span, target=-1, sigma=sigma, nu=cfg.noise * sigma,
                       noise=noise, clean={}, corrupt={}, p_clean=0.0, p_corrupt=0.0)  # fmt: skip
    rows = ids[None].repeat(n + 1, 1).to(device)
    eng = Engine.of(model) if cfg.engine != "hooks" else None
    why = None if eng is not None else ("engine='hooks'" if cfg.engine == "hooks" else Engine.why_not(model))
    traced = ("resid_pre",) if eng is not None else sites
    with hooked(model, [(EMBED_HOOK, _noise_writer(setup, first_clean=True))]), \
            Tracer(model, sites=traced, layers=(0,) if eng is not None else None,
                   batch_size=n + 1) as tracer:  # fmt: skip
        logits, trace = tracer.forward(rows)
    cache = None
    if eng is not None:
        cache, x = eng.full(trace.get("resid_pre", 0).to(device))
        own = eng.logits(x[:, -1])
        ok, diff = agrees(own, logits[:, -1])
        if ok:
            logits = own[:, None]
        else:
            why = f"its unpatched logits differ from the bridge's by {diff:.3g} (over the fp32 gate)"
            eng = cache = None
    if eng is None and cfg.engine == "engine":
        raise InputError(f"the patching engine cannot run this model: {why}; use engine='hooks'")
    target_id = int(logits[0, -1].argmax()) if tgt is None else tgt
    p = _probs(logits, target_id)
    clean, corrupt = {}, {}
    for s in sites:
        for ly in range(int(model.cfg.n_layers)):
            act = cache.get(SITE_STAGE[s], ly) if cache is not None else trace.get(s, ly).to(device)
            clean[f"{s}.{ly}"], corrupt[f"{s}.{ly}"] = act[:1], act[1:]
    return TraceSetup(tokens=ids, span=span, target=target_id, sigma=sigma, nu=cfg.noise * sigma,
                      noise=noise, clean=clean, corrupt=corrupt, p_clean=float(p[0]),
                      p_corrupt=float(p[1:].mean()), engine=eng, cache=cache,
                      engine_why_not=why)  # fmt: skip


def _restore_writer(masks: list[tuple[Tensor, Tensor]], n: int) -> Callable[[Tensor], Tensor]:
    def fn(act: Tensor) -> Tensor:
        view = act.reshape(-1, n, *act.shape[1:])  # [V, N, pos, d]
        for mask, src in masks:
            view = torch.where(mask, src.to(act.dtype)[None], view)
        return view.reshape(act.shape)

    return fn


def _specs(setup: TraceSetup, chunk: Sequence[Variant]) -> list[Intervention]:
    n_pos, v = setup.tokens.numel(), len(chunk)
    groups: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}
    restores: dict[tuple[str, int], Tensor] = {}
    freezes: dict[tuple[str, int], Tensor] = {}
    for j, (rest, frozen) in enumerate(chunk):
        for site, layer, positions in rest:
            m = restores.setdefault((site, layer), torch.zeros(v, 1, n_pos, 1, dtype=torch.bool))
            m[j, 0, list(positions)] = True
        for site, layer in frozen:
            freezes.setdefault((site, layer), torch.zeros(v, 1, n_pos, 1, dtype=torch.bool))[j] = True
    for key, m in restores.items():
        src = setup.clean[f"{key[0]}.{key[1]}"]
        groups.setdefault(key, []).append((m.to(src.device), src))
    for key, m in freezes.items():
        src = setup.corrupt[f"{key[0]}.{key[1]}"]
        groups.setdefault(key, []).append((m.to(src.device), src))
    return [Apply(site=s, layer=ly, fn=_restore_writer(masks, setup.samples))
            for (s, ly), masks in groups.items()]  # fmt: skip


def _is_noop(setup: TraceSetup, variant: Variant) -> bool:
    """A restore changes nothing when every restored position precedes the subject (a causal
    model computes them from the same tokens in both runs: equal in exact arithmetic, though a
    batched forward may round them differently), or when what it writes equals bit for bit what
    is there."""
    if all(max(positions) < setup.span[0] for _, _, positions in variant[0]):
        return True
    for site, layer, positions in variant[0]:
        key, idx = f"{site}.{layer}", list(positions)
        if not torch.equal(setup.clean[key][:, idx].expand_as(setup.corrupt[key][:, idx]),
                           setup.corrupt[key][:, idx]):
            return False
    return True


def _rows_per_forward(model: Model, n_pos: int, max_bytes: int | None) -> int:
    c = model.cfg
    d_mlp = 0 if getattr(c, "attn_only", False) else int(getattr(c, "d_mlp", None) or 4 * int(c.d_model))
    per_row = 4 * n_pos * (int(c.d_vocab) + 2 * int(c.n_heads) * n_pos + 8 * int(c.d_model) + 2 * d_mlp)
    budget = _budget.max_bytes(max_bytes)
    if budget < per_row:
        raise InputError(f"the memory budget of {_budget.human(budget)} is too small for one row of "
                         f"{n_pos} tokens (~{_budget.human(per_row)}); raise max_bytes "
                         f"(or {_budget.ENV_VAR}=16G)")  # fmt: skip
    return max(1, budget // per_row)


@torch.no_grad()
def restore_probs(model: Model, setup: TraceSetup, variants: Sequence[Variant], *,
                  max_bytes: int | None = None, progress: bool = False,
                  skip_noops: bool = True) -> tuple[list[float], dict[str, Any]]:
    """Mean ``p(target)`` over the N noisy rows for each variant, batched (V*N rows a forward).

    A variant is ``(restores, frozen)``: ``restores`` are ``(site, layer, positions)`` written
    from the clean run, ``frozen`` are ``(site, layer)`` held (all positions) at the corrupted
    run's values. Returns the probabilities and the work done (forwards, rows, skipped).
    """
    n = setup.samples
    per = max(1, _rows_per_forward(model, setup.tokens.numel(), max_bytes) // n)
    run = [i for i, v in enumerate(variants) if not (skip_noops and _is_noop(setup, v))]
    if setup.engine is not None:
        return _engine_restore(setup, variants, run, per, progress)
    out = [setup.p_corrupt] * len(variants)
    device = next(model.parameters()).device
    tokens = setup.tokens.to(device)
    forwards = rows = 0
    bar = tqdm(total=len(run), desc="causal trace", file=sys.stderr, disable=not progress, leave=False)
    try:
        for at in range(0, len(run), per):
            idx = run[at : at + per]
            with hooked(model, [(EMBED_HOOK, _noise_writer(setup, first_clean=False))]), \
                    intervene(model, _specs(setup, [variants[i] for i in idx])):
                logits = model(tokens[None].repeat(len(idx) * n, 1))
            p = _probs(logits, setup.target).view(len(idx), n).mean(1).tolist()
            del logits
            for i, value in zip(idx, p, strict=True):
                out[i] = value
            forwards, rows = forwards + 1, rows + len(idx) * n
            bar.update(len(idx))
    finally:
        bar.close()
    return out, {"variants": len(variants), "run": len(run), "skipped": len(variants) - len(run),
                 "forwards": forwards + 1, "rows": rows + n + 1, "chunk_variants": per,
                 "path": "hooks", "engine_skipped_because": setup.engine_why_not}  # fmt: skip


def _join(variant: Variant) -> tuple[int, int, int]:
    """Where a variant joins the engine's forward: ``(layer, stage index, first position)``
    of its earliest restore."""
    restores = variant[0]
    layer, stage = min((ly, STAGES.index(SITE_STAGE[site])) for site, ly, _ in restores)
    return layer, stage, min(min(p) for _, _, p in restores)


def _engine_plan(setup: TraceSetup, chunk: Sequence[Variant]) -> Plan:
    """Rows ``j * N + s``: variant j of the chunk on noisy sample s (sorted by join layer)."""
    assert setup.cache is not None
    n, n_pos = setup.samples, setup.tokens.numel()
    joins = [_join(v) for v in chunk]
    k = len(chunk)
    plan = Plan(target_rows=torch.arange(1, n + 1).repeat(k),
                start=torch.tensor([j[2] for j in joins]).repeat_interleave(n),
                join_layer=torch.tensor([j[0] for j in joins]).repeat_interleave(n), n_pos=n_pos,
                stage=STAGES[joins[0][1]])  # fmt: skip
    groups: dict[tuple[int, str], list[tuple[Tensor, Tensor]]] = {}
    samples = torch.arange(n)
    for j, (restores, frozen) in enumerate(chunk):
        rows = j * n + samples
        for site, layer, positions in restores:
            stage = SITE_STAGE[site]
            p = torch.tensor(positions)
            toks = plan.token(rows.repeat_interleave(len(p)), p.repeat(n))
            vals = setup.cache.get(stage, layer)[0, p].repeat(n, 1)
            groups.setdefault((layer, stage), []).append((toks, vals))
        for site, layer in frozen:  # the corrupted values, at every position still computed
            stage = SITE_STAGE[site]
            p = torch.arange(int(plan.start[j * n]), n_pos)
            toks = plan.token(rows.repeat_interleave(len(p)), p.repeat(n))
            vals = setup.cache.get(stage, layer)[1:][:, p].reshape(-1, setup.cache.get(stage, layer).shape[-1])
            groups.setdefault((layer, stage), []).append((toks, vals))
    for (layer, stage), parts in groups.items():
        plan.add(layer, stage, Write(tokens=torch.cat([t for t, _ in parts]),
                                     values=torch.cat([v for _, v in parts])))  # fmt: skip
    return plan


def _engine_restore(setup: TraceSetup, variants: Sequence[Variant], run: list[int], per: int,
                    progress: bool) -> tuple[list[float], dict[str, Any]]:  # fmt: skip
    """:func:`restore_probs` on the engine: every restore from its layer and position on."""
    eng = setup.engine
    assert eng is not None and setup.cache is not None
    n, n_pos, n_layers = setup.samples, setup.tokens.numel(), eng.n_layers
    out = [setup.p_corrupt] * len(variants)
    # one plan joins at one stage: group by it, each group in join-layer order
    order = sorted(run, key=lambda i: (_join(variants[i])[1], _join(variants[i])[0]))
    forwards = rows = token_layers = 0
    bar = tqdm(total=len(run), desc="causal trace", file=sys.stderr, disable=not progress, leave=False)
    try:
        at = 0
        while at < len(order):
            stage = _join(variants[order[at]])[1]
            idx = [order[at]]
            while (len(idx) < per and at + len(idx) < len(order)
                   and _join(variants[order[at + len(idx)]])[1] == stage):  # fmt: skip
                idx.append(order[at + len(idx)])
            at += len(idx)
            plan = _engine_plan(setup, [variants[i] for i in idx])
            x = eng.suffix(plan, setup.cache)
            last = plan.token(torch.arange(len(idx) * n), torch.full((len(idx) * n,), n_pos - 1))
            p = _probs(eng.logits(x[last])[:, None], setup.target).view(len(idx), n).mean(1).tolist()
            for i, value in zip(idx, p, strict=True):
                out[i] = value
            forwards, rows = forwards + 1, rows + len(idx) * n
            token_layers += int((plan.lengths * (n_layers - plan.join_layer)).sum())
            bar.update(len(idx))
    finally:
        bar.close()
    naive = (len(variants) + 1) * n * n_pos * n_layers
    return out, {"variants": len(variants), "run": len(run), "skipped": len(variants) - len(run),
                 "forwards": forwards + 1, "rows": rows + n + 1, "chunk_variants": per,
                 "path": "engine", "token_layers": token_layers + (n + 1) * n_pos * n_layers,
                 "flops_vs_naive": (token_layers + (n + 1) * n_pos * n_layers) / naive}  # fmt: skip


def grid_variants(cfg: CausalTraceConfig, n_layers: int, n_pos: int) -> list[Variant]:
    """The (layer, token) variants of a trace, layer-major (``[layer, pos]`` order)."""
    site = KINDS[cfg.kind]
    out: list[Variant] = []
    for layer in range(n_layers):
        for t in range(n_pos):
            if cfg.kind == "hidden":
                rest: tuple[Restore, ...] = ((site, layer, (t,)),)
            else:
                rest = tuple((site, ly, (t,)) for ly in window_layers(layer, n_layers, cfg.window))
            frozen = (tuple((KINDS[cfg.severed], ly) for ly in range(layer + 1, n_layers))
                      if cfg.severed else ())  # fmt: skip
            out.append((rest, frozen))
    return out


def causal_trace(
    model: Model,
    prompt: str | Sequence[int] | Tensor,
    subject: str | tuple[int, int],
    *,
    target: str | int | None = None,
    kind: str = "hidden",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    sigma: float | None = None,
    seed: int = 0,
    severed: str | None = None,
    max_bytes: int | None = None,
    progress: bool = True,
    engine: str = "auto",
) -> CausalTraceResult:
    """ROME causal tracing of one prompt: ``p(target)`` with each (layer, token) restored.

    Args:
        model: the model.
        prompt: text (needs a tokenizer; BOS prepended as the model does) or token ids.
        subject: the subject's text (a substring of the prompt) or a ``(start, end)`` token span.
        target: the answer token (text of one token, or an id); None: the clean top-1.
        kind: ``hidden``, ``mlp`` or ``attn``.
        window: layers restored together for ``mlp``/``attn`` (:func:`window_layers`).
        samples: noisy rows N.
        noise: ``nu = noise * sigma``.
        sigma: embedding std (default: the std of the token-embedding matrix).
        seed: seed of the noise (the same samples for every restore).
        severed: None, ``mlp`` or ``attn`` (see the module docstring; ``kind="hidden"`` only).
        max_bytes: memory budget of one batched forward.
        progress: a progress bar on stderr.
        engine: ``auto``, ``engine`` or ``hooks`` (see :class:`CausalTraceConfig`).

    Returns:
        A :class:`CausalTraceResult` with ``scores[layer, pos]`` = ``p_patched``.

    Raises:
        InputError: empty or too long prompt, subject not in the prompt, target not one token,
            bad options. HookNameError: ``mlp`` on an attention-only model.

    >>> from mechscope.models import load
    >>> m = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
    >>> causal_trace(m, [1, 2, 3, 4], (1, 2), kind="mlp", samples=2, progress=False).scores.shape
    torch.Size([2, 4])
    """
    cfg = CausalTraceConfig(kind=kind, window=window, samples=samples, noise=noise, sigma=sigma,
                            seed=seed, severed=severed, max_bytes=max_bytes, engine=engine,
                            progress=progress)  # fmt: skip
    setup = prepare_trace(model, prompt, subject, target=target, config=cfg)
    n_layers, n_pos = int(model.cfg.n_layers), setup.tokens.numel()
    probs, work = restore_probs(model, setup, grid_variants(cfg, n_layers, n_pos),
                                max_bytes=cfg.max_bytes, progress=cfg.progress)  # fmt: skip
    scores = torch.tensor(probs, dtype=torch.float64).view(n_layers, n_pos)
    tokens = _labels(model, setup.tokens)
    return CausalTraceResult(
        provenance=Provenance.of(model, asdict(cfg), seed=seed), scores=scores, tokens=tokens,
        token_ids=tuple(int(i) for i in setup.tokens), subject=setup.span, target=setup.target,
        target_token=_labels(model, torch.tensor([setup.target]))[0], p_clean=setup.p_clean,
        p_corrupt=setup.p_corrupt, trace_kind=cfg.kind, window=cfg.window, samples=cfg.samples,
        noise=float(cfg.noise), sigma=setup.sigma, severed=cfg.severed, n_skipped=work["skipped"],
        work=work,
    )  # fmt: skip


def _labels(model: Model, ids: Tensor) -> tuple[str, ...]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return tuple(str(int(i)) for i in ids)
    try:
        return tuple(str(tok.decode([int(i)])) for i in ids)
    except Exception:  # noqa: BLE001  (a tokenizer that cannot decode an id: show the id)
        return tuple(str(int(i)) for i in ids)
