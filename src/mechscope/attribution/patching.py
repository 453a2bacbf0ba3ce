"""Exact activation patching, batched: every patched variant of a sweep, many per forward.

Method (Vig et al. 2020; Meng et al. 2022; Wang et al. 2022; Heimersheim & Nanda 2024, "How to
use and interpret activation patching"): run the model on one prompt with one activation taken
from the other prompt's run, and measure the metric. *Denoise* writes the clean run's activation
into the corrupt run, *noise* the corrupt run's into the clean run. A sweep patches every layer x
position (x head) of one site. The numbers are TransformerLens's ``patching.get_act_patch_*``
(the test oracle), which runs one forward per patch; this engine computes the same ones with less
overhead:

1. the engine (:mod:`mechscope.attribution.engine`, the default where it knows the model): a
   forward of our own over the bridge's weights, checked against the bridge's logits before use
   (fp32 gate of PERFORMANCE.md; else the hooks below run). Each patched variant *joins* the
   forward at its patched layer and stage and computes only positions >= its patched position,
   with the target run's keys/values for the positions before (a causal model leaves them
   unchanged), so a sweep costs about the floor of PERFORMANCE.md instead of one full forward per
   patch. Variants of every layer share one forward (rows join as the layers go by) under the
   memory budget (``max_bytes``; ``$MECHSCOPE_MAX_BYTES`` else 4 GiB). With the default metric
   only the two logits it reads are computed (the unembedding rows of the answer and the corrupt
   answer at ``answer_pos``), and positions after the last ``answer_pos`` are never computed.
   ``dtype="bfloat16"`` runs the same sweep on a bf16 copy of the weights: a screen, not an
   exact result.
2. the hook path (``engine="hooks"``, and the fallback): V variants stacked on the batch axis,
   each with its own selection mask, written by one :class:`~mechscope.probes.Apply` per layer
   through :func:`~mechscope.probes.intervene` (``torch.where(mask, source, act)``). ``resume``
   starts at the patched layer through the bridge's ``start_at_layer``, which in TransformerLens
   4.3 still executes the blocks below (exact, no FLOPs saved; off by default).
3. exact no-ops are skipped on both paths: a patch whose source equals the activation it
   replaces bit for bit (positions before the first clean/corrupt difference, ``resid_pre`` of
   layer 0 where tokens agree, dead heads), and, with the default answer-position metric, a patch
   after every row's scored position (causal attention) or at the last layer after its attention
   at a position no row scores; its score is the unpatched run's, exactly (0 when normalised).
   The count is reported (``n_skipped``), and ``work`` says which path ran, why the engine did
   not, and the layer FLOPs relative to the naive loop (``flops_vs_naive``).

Right-padded rows are run without an attention mask, as the oracle does (harmless for a causal
model's real tokens).

>>> import torch
>>> from mechscope.models import load
>>> model = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8")
>>> clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 5, 4]])
>>> metric = lambda logits: logits[:, -1, 0].mean()
>>> r = patch_sweep(model, (clean, corrupt), metric=metric, progress=False)
>>> r.scores.shape, r.n_skipped  # bit-identical activations: positions 0-1 at both layers, 3 at layer 0
(torch.Size([2, 4]), 5)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechscope.attribution.engine import SITE_STAGE, Engine, Plan, RunCache, Write, agrees
from mechscope.attribution.result import PatchResult
from mechscope.errors import HookNameError, InputError
from mechscope.metrics import Direction, answer_prob, logit_diff, normalised_patching
from mechscope.probes import Apply, Intervention, Tracer, intervene
from mechscope.probes import budget as _budget
from mechscope.probes.sites import check_site_on_model
from mechscope.results import Provenance
from mechscope.scale import Backend, as_backend
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model

PatchSite = Literal["resid_pre", "resid_mid", "attn_out", "mlp_out", "heads"]
PATCH_SITES: tuple[str, ...] = get_args(PatchSite)
By = Literal["position", "all"]
MetricFn = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, ""]]
#: A variant: (layer, position or None for all, head or None for all).
Variant = tuple[int, int | None, int | None]
DEFAULT_METRIC = "logit_diff(answer - corrupt_answer) at answer_pos, normalised by the gap"


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """Options of :func:`patch_sweep` (the metric is passed beside it: it is a function).

    Attributes:
        site: ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out`` or ``heads`` (``hook_z``).
        by: ``position`` (one patch per layer x position (x head)) or ``all`` (every position).
        direction: ``denoise`` (clean into the corrupt run) or ``noise`` (corrupt into clean).
        max_bytes: memory budget of one chunk of variants; None: the tracer's default.
        resume: hook path only: start each variant's forward at its layer through the bridge
            (exact; saves no FLOPs in TransformerLens 4.3, see the module docstring).
        engine: ``auto`` (the engine of :mod:`mechscope.attribution.engine` where it knows the
            model and its unpatched logits pass the fp32 gate against the bridge's, else the
            hooks), ``engine`` (required: an error where it cannot run) or ``hooks``.
        dtype: None (the model's, exact) or ``bfloat16``/``float16``: a screening sweep on a
            reduced-precision copy of the weights (engine only; compare with fp32 before
            trusting a ranking).
        progress: a tqdm bar on stderr.
    """

    site: str = "resid_pre"
    by: str = "position"
    direction: str = "denoise"
    max_bytes: int | None = None
    resume: bool = False
    engine: str = "auto"
    dtype: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.site not in PATCH_SITES:
            raise HookNameError(f"cannot sweep site {self.site!r}; choose from "
                                f"{', '.join(PATCH_SITES)}")  # fmt: skip
        if self.by not in ("position", "all"):
            raise InputError(f"by must be 'position' or 'all', got {self.by!r}")
        if self.direction not in ("denoise", "noise"):
            raise InputError(f"direction must be 'denoise' or 'noise', got {self.direction!r}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise InputError(f"max_bytes must be a positive number of bytes, got {self.max_bytes}")
        if self.engine not in ("auto", "engine", "hooks"):
            raise InputError(f"engine must be 'auto', 'engine' or 'hooks', got {self.engine!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise InputError(f"dtype must be None, 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.dtype not in (None, "float32") and self.engine == "hooks":
            raise InputError(f"dtype={self.dtype!r} (screening) runs on the engine; drop "
                             "engine='hooks'")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# inputs


def _pair(task_or_pair: TaskBatch | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    if isinstance(task_or_pair, TaskBatch):
        return task_or_pair.clean, task_or_pair.corrupt
    if not (isinstance(task_or_pair, tuple | list) and len(task_or_pair) == 2):
        raise InputError("give a TaskBatch or a (clean_tokens, corrupt_tokens) pair")
    clean, corrupt = (torch.as_tensor(t) for t in task_or_pair)
    clean, corrupt = (t[None] if t.ndim == 1 else t for t in (clean, corrupt))
    if clean.ndim != 2 or clean.dtype.is_floating_point or corrupt.dtype.is_floating_point:
        raise InputError(f"tokens must be integer [batch, pos]; got {tuple(clean.shape)}")
    if clean.shape != corrupt.shape:
        raise InputError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} tokens "
                         "differ in shape; pad them to the same length (patching writes position "
                         "p of one run into position p of the other)")  # fmt: skip
    if clean.numel() == 0:
        raise InputError("empty prompts: give at least one token per row")
    return clean, corrupt


def sweep_inputs(model: Model, cfg: SweepConfig, task_or_pair: TaskBatch | tuple[Tensor, Tensor],
                 metric: Any) -> tuple[Tensor, Tensor, TaskBatch | None]:
    """The clean and corrupt tokens of a sweep and its task, checked before any forward (shared by
    :func:`patch_sweep` and the attribution estimate): a pair needs a metric, the site must exist
    on the model, the prompts must fit its context."""
    clean, corrupt = _pair(task_or_pair)
    task = task_or_pair if isinstance(task_or_pair, TaskBatch) else None
    if task is None and metric is None:
        raise InputError("a (clean, corrupt) token pair has no answers: pass metric=fn(logits) "
                         "-> scalar, or give a TaskBatch")  # fmt: skip
    check_site_on_model(model, cfg.site, range(int(model.cfg.n_layers)))
    if clean.shape[1] > int(model.cfg.n_ctx):
        raise InputError(f"prompts of {clean.shape[1]} tokens exceed the model's context of "
                         f"{model.cfg.n_ctx}")  # fmt: skip
    return clean, corrupt, task


def _variants(cfg: SweepConfig, n_layers: int, n_pos: int, n_heads: int) -> list[Variant]:
    layers, positions = range(n_layers), range(n_pos)
    heads: list[int | None] = list(range(n_heads)) if cfg.site == "heads" else [None]
    if cfg.by == "all":
        return [(ly, None, h) for ly in layers for h in heads]
    return [(ly, p, h) for ly in layers for p in positions for h in heads]


def _grid(cfg: SweepConfig, n_layers: int, n_pos: int, n_heads: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if cfg.site == "heads":
        if cfg.by == "all":
            return ("layer", "head"), (n_layers, n_heads)
        return ("layer", "pos", "head"), (n_layers, n_pos, n_heads)
    if cfg.by == "all":
        return ("layer",), (n_layers,)
    return ("layer", "pos"), (n_layers, n_pos)


def _site_elems(model: Model, site: str) -> int:
    cfg = model.cfg
    return int(cfg.n_heads) * int(cfg.d_head) if site == "heads" else int(cfg.d_model)


def plan_chunk(model: Model, cfg: SweepConfig, batch: int, n_pos: int) -> int:
    """How many variants fit in one forward under the budget (raises when not even one does).

    The estimate per variant (``batch`` rows of ``n_pos`` tokens, 4 bytes a number): the logits,
    one layer's attention scores and pattern, ~8 residual-width and 2 MLP-width activations, and
    the patch mask; fixed: the two traced runs of the site at every layer.
    """
    c = model.cfg
    d_mlp = 0 if c.attn_only else int(getattr(c, "d_mlp", None) or 4 * int(c.d_model))
    per_row = (int(c.d_vocab) + 2 * int(c.n_heads) * n_pos + 8 * int(c.d_model) + 2 * d_mlp
               + (int(c.d_model) if cfg.resume else 0))  # fmt: skip
    per_variant = 4 * batch * n_pos * per_row + n_pos * int(c.n_heads)
    fixed = 2 * 4 * int(c.n_layers) * batch * n_pos * (_site_elems(model, cfg.site) + int(c.d_model))
    budget = _budget.max_bytes(cfg.max_bytes)
    if budget - fixed < per_variant:
        raise InputError(
            f"the memory budget of {_budget.human(budget)} is too small for one patched variant: "
            f"the two source runs need ~{_budget.human(fixed)} and each variant "
            f"~{_budget.human(per_variant)} ({batch} rows x {n_pos} tokens); raise max_bytes "
            f"(or {_budget.ENV_VAR}=16G), or use fewer or shorter prompts"
        )
    return max(1, (budget - fixed) // per_variant)


# ---------------------------------------------------------------------------------------------
# the sweep


def _trace(model: Model, tokens: Tensor, sites: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
    n_layers = int(model.cfg.n_layers)
    with Tracer(model, sites=sites, batch_size=len(tokens)) as tracer:
        logits, trace = tracer.forward(tokens)
    return logits, {f"{s}.{ly}": trace.get(s, ly) for s in sites for ly in range(n_layers)}


def _differs(src: Tensor, tgt: Tensor, by: str) -> Tensor:
    """``[pos]`` or ``[pos, head]`` (or ``[]``/``[head]`` for by=all): where src != tgt anywhere."""
    ne = src != tgt  # [batch, pos, (head,) d]
    out = ne.any(-1).any(0)  # [pos, (head)]
    return out.any(0) if by == "all" else out


def _writer(mask: Tensor, src: Tensor, n_var: int) -> Callable[[Tensor], Tensor]:
    """``act [V*B, ...] -> where(mask [V, 1, ..., 1], src [B, ...], act)`` without copying src."""

    def fn(act: Tensor) -> Tensor:
        view = act.reshape(n_var, -1, *act.shape[1:])
        return torch.where(mask, src.to(act.dtype)[None], view).reshape(act.shape)

    return fn


def _specs(site: str, chunk: list[Variant], source: dict[str, Tensor], n_pos: int) -> list[Intervention]:
    specs: list[Intervention] = []
    for layer in dict.fromkeys(v[0] for v in chunk):
        src = source[f"{site}.{layer}"]
        mask = torch.zeros(len(chunk), 1, *src.shape[1:-1], 1, dtype=torch.bool, device=src.device)
        for j, (ly, pos, head) in enumerate(chunk):
            if ly == layer:
                idx: tuple[Any, ...] = (j, 0, slice(None) if pos is None else pos)
                mask[idx + ((slice(None) if head is None else head,) if src.ndim == 4 else ())] = True
        specs.append(Apply(site=site, layer=layer, fn=_writer(mask, src, len(chunk))))
    return specs


def _chunks(run: list[Variant], per: int, by_layer: bool) -> Iterator[list[Variant]]:
    if not by_layer:
        yield from (run[i : i + per] for i in range(0, len(run), per))
        return
    for layer in dict.fromkeys(v[0] for v in run):
        group = [v for v in run if v[0] == layer]
        yield from (group[i : i + per] for i in range(0, len(group), per))


@dataclass
class _Runs:
    """The two unpatched runs of a sweep, as the patched forwards see them."""

    source: dict[str, Tensor]  # "<site>.<layer>" -> [batch, pos, ...]
    target: dict[str, Tensor]
    logits: tuple[Tensor, Tensor]  # clean, corrupt: [batch, pos, vocab] (or answer rows only)
    engine: Engine | None = None
    caches: tuple[RunCache, RunCache] | None = None  # source, target (engine only)
    target_x: Tensor | None = None  # the target run's final residual [batch, pos, d] (engine)
    engine_diff: float | None = None  # max |engine - bridge| of the unpatched logits


def _engine_for(model: Model, cfg: SweepConfig) -> tuple[Engine | None, str | None]:
    if cfg.engine == "hooks":
        return None, "engine='hooks'"
    why = Engine.why_not(model)
    if why is not None:
        if cfg.engine == "engine" or cfg.dtype not in (None, "float32"):
            raise InputError(f"the patching engine cannot run this model: {why}; use "
                             "engine='hooks' (exact, slower) in fp32")  # fmt: skip
        return None, why
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    return Engine.of(model, dtype=dtype), None


def _engine_runs(model: Model, eng: Engine, cfg: SweepConfig, clean: Tensor,
                 corrupt: Tensor) -> _Runs | str:  # fmt: skip
    """Both runs through the engine (from the bridge's layer-0 input), checked against the
    bridge's logits; a string says why the engine is not used."""
    b = len(clean)
    with Tracer(model, sites=("resid_pre",), layers=(0,), batch_size=2 * b) as tracer:
        bridge, trace = tracer.forward(torch.cat([clean, corrupt]))  # one forward for both runs
    both, x = eng.full(trace.get("resid_pre", 0).to(clean.device))
    own = eng.logits(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)
    ok, diff = agrees(own, bridge)
    caches = [both.select_rows(slice(0, b)), both.select_rows(slice(b, 2 * b))]
    finals = [x[:b], x[b:]]
    logits = [own[:b], own[b:]]
    if not ok and cfg.dtype in (None, "float32"):
        return f"its unpatched logits differ from the bridge's by {diff:.3g} (over the fp32 gate)"
    stage = SITE_STAGE[cfg.site]
    n_layers = int(model.cfg.n_layers)

    def site_acts(cache: RunCache) -> dict[str, Tensor]:
        return {f"{cfg.site}.{ly}": cache.get(stage, ly) for ly in range(n_layers)}

    c_acts, k_acts = site_acts(caches[0]), site_acts(caches[1])
    denoise = cfg.direction == "denoise"
    return _Runs(source=c_acts if denoise else k_acts, target=k_acts if denoise else c_acts,
                 logits=(logits[0], logits[1]), engine=eng,
                 caches=(caches[0], caches[1]) if denoise else (caches[1], caches[0]),
                 target_x=finals[1] if denoise else finals[0], engine_diff=diff)  # fmt: skip


def _hook_runs(model: Model, cfg: SweepConfig, clean: Tensor, corrupt: Tensor) -> _Runs:
    sites = (cfg.site, "resid_pre") if cfg.resume and cfg.site != "resid_pre" else (cfg.site,)
    clean_logits, clean_act = _trace(model, clean, sites)
    corrupt_logits, corrupt_act = _trace(model, corrupt, sites)
    denoise = cfg.direction == "denoise"
    return _Runs(source=clean_act if denoise else corrupt_act,
                 target=corrupt_act if denoise else clean_act,
                 logits=(clean_logits, corrupt_logits))  # fmt: skip


def _engine_plan(cfg: SweepConfig, chunk: list[Variant], runs: _Runs, b: int, n_pos: int,
                 differs: dict[int, Tensor]) -> Plan:  # fmt: skip
    """Rows ``j * b + row`` (variant j of the chunk, batch row ``row``): each joins at its
    patched layer and starts at its patched position (by=all: the first position where source
    and target differ). The chunk is in layer order."""
    assert runs.caches is not None
    stage = SITE_STAGE[cfg.site]
    src = runs.caches[0].acts[stage]  # [layer, batch, pos, (head,) d]
    # one (variant, position) entry per written position
    var_idx, var_pos, starts = [], [], []
    for j, (ly, pos, head) in enumerate(chunk):
        if pos is not None:
            positions = [pos]
        else:
            d = differs[ly] if head is None else differs[ly][:, head]
            positions = [p for p in range(n_pos) if bool(d[p])]
        starts.append(min(positions))
        var_idx += [j] * len(positions)
        var_pos += positions
    k = len(chunk)
    layers = torch.tensor([v[0] for v in chunk])
    heads = torch.tensor([-1 if v[2] is None else v[2] for v in chunk])
    plan = Plan(target_rows=torch.arange(b).repeat(k), start=torch.tensor(starts).repeat_interleave(b),
                join_layer=layers.repeat_interleave(b), n_pos=n_pos, stage=stage)  # fmt: skip
    # every entry for every batch row
    vj = torch.tensor(var_idx).repeat_interleave(b)
    vp = torch.tensor(var_pos).repeat_interleave(b)
    row = torch.arange(b).repeat(len(var_idx))
    toks = plan.token(vj * b + row, vp)
    lyr, hd = layers[vj], heads[vj]
    for layer in layers.unique().tolist():
        for per_head in (False, True):
            sel = (lyr == layer) & ((hd >= 0) if per_head else (hd < 0))
            if not bool(sel.any()):
                continue
            vals = src[layer][row[sel], vp[sel]]
            if per_head:
                vals = vals[torch.arange(len(vals)), hd[sel]]
            plan.add(layer, stage, Write(tokens=toks[sel], values=vals,
                                         heads=hd[sel] if per_head else None))  # fmt: skip
    return plan


@torch.no_grad()
def patch_sweep(
    model: Model,
    task_or_pair: TaskBatch | tuple[Tensor, Tensor],
    *,
    site: str = "resid_pre",
    by: str = "position",
    direction: str = "denoise",
    metric: MetricFn | None = None,
    max_bytes: int | None = None,
    progress: bool = True,
    resume: bool = False,
    engine: str = "auto",
    dtype: str | None = None,
    backend: str | Backend = "local",
    shard_size: int | None = None,
) -> PatchResult:
    """Patch every layer x position (x head) of one site and score each patched run.

    Args:
        model: the model.
        task_or_pair: a :class:`~mechscope.tasks.base.TaskBatch`, or ``(clean, corrupt)`` token
            tensors of equal shape (then ``metric`` is required).
        site: ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out`` or ``heads``
            (:data:`PatchSite`; a plain ``str`` so that a wrong one gets a HookNameError).
        by: ``position`` or ``all`` (every position at once).
        direction: ``denoise`` (clean activation into the corrupt run) or ``noise``.
        metric: ``logits [batch, pos, vocab] -> scalar``, reported raw for every patched run;
            None: the task's logit difference at ``answer_pos``, normalised (0 = the unpatched
            run, 1 = the other run), as :func:`mechscope.metrics.normalised_patching`.
        max_bytes: memory budget of one chunk of variants.
        progress: a progress bar on stderr.
        resume: hook path: start each variant at its patched layer (see the module docstring).
        engine: ``auto``, ``engine`` or ``hooks`` (see :class:`SweepConfig`).
        dtype: None (exact, fp32) or ``bfloat16``/``float16`` (screening, engine only).
        backend, shard_size: ``ray`` (a :class:`~mechscope.scale.Backend`), or a ``shard_size``,
            sweeps the pairs in shards of ``shard_size`` (default 32), merged by
            :func:`mechscope.scale.sweeps.patch_sweep_sharded`: the same bits on every backend.

    Returns:
        A :class:`PatchResult`: scores ``[layer, pos]``, ``[layer, pos, head]``, ``[layer, head]``
        or ``[layer]``; ``work`` says which path ran and how much it computed.

    Raises:
        InputError: clean/corrupt shapes differ, no metric for a token pair, a budget too small
            for one variant, a clean-corrupt gap too small to normalise, ``engine='engine'`` on a
            model the engine cannot run.
        HookNameError: a site the sweep does not patch, or the model lacks (an MLP site on an
            attention-only model).
    """
    cfg = SweepConfig(site=site, by=by, direction=direction, max_bytes=max_bytes,
                      resume=resume, engine=engine, dtype=dtype, progress=progress)  # fmt: skip
    clean, corrupt, task = sweep_inputs(model, cfg, task_or_pair, metric)
    sharding = as_backend(backend, shard_size=shard_size)
    if sharding.sharded:
        from mechscope.scale.sweeps import patch_sweep_sharded

        if task is None:
            raise InputError("a sharded sweep splits a TaskBatch's pairs; give a TaskBatch")
        return patch_sweep_sharded(model, task, backend=sharding, progress=progress, site=site, by=by,
                                   direction=direction, metric=metric, max_bytes=max_bytes,
                                   resume=resume, engine=engine, dtype=dtype)  # fmt: skip
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    b, n_pos = clean.shape
    per = plan_chunk(model, cfg, b, n_pos)

    device = next(model.parameters()).device
    clean, corrupt = clean.to(device), corrupt.to(device)
    eng, why = _engine_for(model, cfg)
    runs: _Runs | str = _engine_runs(model, eng, cfg, clean, corrupt) if eng is not None else why or ""
    if isinstance(runs, str):
        if cfg.engine == "engine":
            raise InputError(f"the patching engine cannot run this model: {runs}")
        why, runs = runs, _hook_runs(model, cfg, clean, corrupt)
    denoise = cfg.direction == "denoise"
    tokens = corrupt if denoise else clean
    clean_logits, corrupt_logits = runs.logits

    if task is not None:
        rows = (task.answer.to(device), task.corrupt_answer.to(device), task.answer_pos.to(device))
        def ld(logits: Tensor) -> Tensor:  # [k*B] -> per-row logit differences
            k = logits.shape[0] // b
            return logit_diff(logits, *(r.repeat(k) for r in rows))
        probs = [float(answer_prob(lg, rows[0], rows[2]).mean()) for lg in (clean_logits, corrupt_logits)]
    raw: Callable[[Tensor], Tensor]
    if metric is None:
        assert task is not None
        raw = lambda lg: ld(lg).view(-1, b).mean(1)  # noqa: E731
        name = DEFAULT_METRIC
    else:
        user = metric
        raw = lambda lg: torch.stack([user(part).float() for part in lg.split(b)])  # noqa: E731
        name = getattr(metric, "__name__", "metric")
    m_clean, m_corrupt = float(raw(clean_logits)[0]), float(raw(corrupt_logits)[0])
    unpatched = m_corrupt if denoise else m_clean
    target_logits = corrupt_logits if denoise else clean_logits
    del clean_logits, corrupt_logits

    variants = _variants(cfg, n_layers, n_pos, n_heads)
    after = int(task.answer_pos.max()) if task is not None and metric is None else n_pos
    differs = {ly: _differs(runs.source[f"{cfg.site}.{ly}"], runs.target[f"{cfg.site}.{ly}"], cfg.by)
               for ly in range(n_layers)}  # fmt: skip
    # by=all on the engine: where each position differs (to start each variant at the first)
    pos_differs = {ly: runs.source[f"{cfg.site}.{ly}"].ne(runs.target[f"{cfg.site}.{ly}"]).any(-1).any(0)
                   for ly in range(n_layers)} if cfg.by == "all" else {}  # fmt: skip

    # with the default metric only the answer positions are read: a patch after the last
    # attention (the last layer's sites but resid_pre) elsewhere cannot reach them
    read = set(task.answer_pos.tolist()) if task is not None and metric is None else set(range(n_pos))

    def needed(v: Variant) -> bool:
        ly, pos, head = v
        if pos is not None and pos > after:
            return False
        if pos is not None and pos not in read and ly == n_layers - 1 and cfg.site != "resid_pre":
            return False
        d = differs[ly] if pos is None else differs[ly][pos]
        return bool(d if head is None else d[head])

    run = [v for v in variants if needed(v)]
    values: dict[Variant, float] = {}
    forwards = rows_run = tokens_run = 0
    t_eff = after + 1 if metric is None else n_pos  # later positions cannot change the metric
    bar = tqdm(total=len(run), desc=f"patch {cfg.site}", file=sys.stderr,
               disable=not cfg.progress, leave=False)  # fmt: skip
    try:
        for chunk in _chunks(run, per, cfg.resume):
            k = len(chunk)
            if runs.engine is not None:
                plan = _engine_plan(cfg, chunk, runs, b, t_eff, pos_differs)
                vals = _engine_scores(runs, plan, k, b, task if metric is None else None,
                                      raw, target_logits)  # fmt: skip
                tokens_run += int((plan.lengths * (n_layers - plan.join_layer)).sum())
            else:
                with intervene(model, _specs(cfg.site, chunk, runs.source, n_pos)):
                    if cfg.resume:
                        resid = runs.target[f"resid_pre.{chunk[0][0]}"]
                        logits = model(resid.repeat(k, 1, 1), start_at_layer=chunk[0][0])
                    else:
                        logits = model(tokens.repeat(k, 1))
                vals = raw(logits).tolist()
                del logits
                tokens_run += k * b * n_pos * n_layers
            values.update(zip(chunk, vals, strict=True))
            forwards, rows_run = forwards + 1, rows_run + k * b
            bar.update(k)
    finally:
        bar.close()

    axes, shape = _grid(cfg, n_layers, n_pos, n_heads)
    grid = torch.tensor([values.get(v, unpatched) for v in variants], dtype=torch.float32)
    scores = raw_scores = grid.view(shape)
    if metric is None:
        scores = torch.as_tensor(normalised_patching(scores, m_clean, m_corrupt,
                                                          cast(Direction, cfg.direction)))
    u = len(variants)
    naive = (u + 1) * b * n_pos * n_layers  # token-layers of one full forward per patch (+1 run)
    work = {"patches": u, "run": len(run), "skipped": u - len(run), "forwards": forwards + 2,
            "rows": rows_run + 2 * b, "chunk_variants": per,
            "path": "engine" if runs.engine is not None else "hooks",
            "engine_skipped_because": why if runs.engine is None else None,
            "engine_max_logit_diff": runs.engine_diff,
            "dtype": cfg.dtype or "float32",
            "token_layers": tokens_run + 2 * b * n_pos * n_layers,
            "flops_vs_naive": (tokens_run + 2 * b * n_pos * n_layers) / naive}  # fmt: skip
    return PatchResult(
        provenance=Provenance.of(model, {**asdict(cfg), "metric": name}),
        scores=scores, axes=axes, tokens=_labels(model, clean[0]), site=cfg.site,
        direction=cfg.direction, metric=name, normalised=metric is None, metric_clean=m_clean,
        metric_corrupt=m_corrupt, n_patches=u, n_skipped=u - len(run),
        prob_clean=probs[0] if task is not None else None,
        prob_corrupt=probs[1] if task is not None else None, work=work,
        raw_scores=raw_scores if metric is None else None,
    )  # fmt: skip


def _engine_scores(runs: _Runs, plan: Plan, k: int, b: int, task: TaskBatch | None,
                   raw: Callable[[Tensor], Tensor], target_logits: Tensor) -> list[float]:  # fmt: skip
    """The metric of each of the ``k`` variants of one engine chunk."""
    eng = runs.engine
    assert eng is not None and runs.caches is not None and runs.target_x is not None
    x = eng.suffix(plan, runs.caches[1])
    rows = torch.arange(k * b)
    batch_row = rows % b
    if task is not None:  # the default metric: two logits per row at its answer position
        pos = task.answer_pos.to(torch.long).cpu()[batch_row]
        cols = torch.stack([task.answer.cpu(), task.corrupt_answer.cpu()], 1)[batch_row]
        fresh = pos >= plan.start  # else the position kept the target run's value
        final = runs.target_x[batch_row, pos].to(x.dtype)
        final[fresh] = x[plan.token(rows[fresh], pos[fresh])]
        two = eng.logits(final, cols.to(final.device))
        return (two[:, 0] - two[:, 1]).view(k, b).mean(1).tolist()
    full = target_logits.repeat(k, 1, 1).clone()  # [k*b, pos, vocab]
    full[plan.tok_row, plan.tok_pos] = eng.logits(x).to(full.dtype)
    return raw(full).tolist()


def _labels(model: Model, tokens: Int[Tensor, " pos"]) -> tuple[str, ...]:
    tok = getattr(model, "tokenizer", None)
    ids = [int(t) for t in tokens]
    if tok is None:
        return tuple(str(i) for i in ids)
    try:
        return tuple(str(tok.decode([i])) for i in ids)
    except Exception:  # noqa: BLE001  (a tokenizer that cannot decode an id: show the id)
        return tuple(str(i) for i in ids)


def naive_flops_ratio(result: PatchResult) -> float:
    """Layer FLOPs of the sweep (patched rows and the two source runs; token-layers computed)
    per FLOPs of the naive one-full-forward-per-patch loop."""
    value = result.work.get("flops_vs_naive", math.nan)
    return float(value) if isinstance(value, int | float) else math.nan


__all__ = ["PATCH_SITES", "PatchResult", "PatchSite", "SweepConfig", "naive_flops_ratio",
           "patch_sweep", "plan_chunk"]  # fmt: skip
