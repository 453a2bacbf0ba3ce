"""Ground truth of a zoo checkpoint: accuracy, per-head scores, patching tables, ablations.

Everything runs through mechscope's own probes (:func:`~mechscope.probes.trace` to read
activations, :func:`~mechscope.probes.intervene` to change them); TransformerLens's ``patching``
module is the oracle the tests compare these tables with, not a dependency. What is measured
(all on fresh seeded samples, never on training rows):

- accuracy: top-1 at each row's ``answer_pos`` over the task's evaluation batches.
- previous-token and induction scores: TransformerLens's detection patterns
  (``head_detector.get_previous_token_head_detection_pattern`` / ``..._induction_...``) and its
  ``compute_head_attention_similarity_score`` ("mul": the fraction of a head's attention that lands
  where the pattern says) on traced patterns of ``[BOS] R R`` rows of random tokens. Query rows
  where the pattern is empty (the first copy for induction, BOS for previous-token) are left out,
  so a perfect head scores 1.
- copy score (Wu et al. 2024): the fraction of correctly answered rows whose argmax attention from
  ``answer_pos`` lands on an earlier position holding the answer token; local score: attention
  mass on the last 4 keys; key-tag score (retrieval): attention from the needle's value to its key.
  These are reported detector scores, not the definition of any head set.
- patching (:func:`patching_tables`), on clean/corrupt pairs (``data.PATCH_BATCHES``), in both
  directions: *denoise* runs the corrupt prompt with a clean activation written in, *noise* runs
  the clean prompt with a corrupt activation written in, and with LD = mean logit difference
  (answer - corrupt answer) at ``answer_pos``: denoise = (LD(patched) - LD_corrupt) / gap,
  noise = (LD_clean - LD(patched)) / gap, gap = LD_clean - LD_corrupt
  (:func:`mechscope.metrics.normalised_patching`). Tables: each head's output (``hook_z``) at all
  positions and per position, ``resid_pre`` per layer x position, ``mlp_out`` at all positions and
  per position. Each patched variant is one intervention (:class:`~mechscope.probes.Apply`
  writing ``torch.where(selection, source, act)``); variants are stacked along the batch so one
  forward runs several. A patch whose source equals the activation it replaces (bit for bit:
  positions before the first corrupted token, ``resid_pre`` of layer 0 where tokens agree, pruned
  heads) is an exact no-op: its effect is stored as 0 without a forward. So is a patch after the
  scored position (causal attention).
- retrieval heads (:data:`RETRIEVAL_RULE`): from ablation, not from the copy score.

Circuit rule (:data:`CIRCUIT_RULE`): a head is a circuit head when patching it alone moves the
normalised logit difference by at least ``THRESHOLD`` in either direction.

Caveat: head scores on ``[BOS] R R`` use random ids from the whole vocabulary, which for the
structured vocabularies of retrieval/facts/ioi is off-distribution.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechscope.circuits.attention import uniform_attention
from mechscope.metrics import MIN_GAP, Direction, logit_diff, normalised_patching
from mechscope.models.zoo.data import EVAL_BATCHES, PATCH_BATCHES, PATCH_CORRUPTION
from mechscope.models.zoo.groundtruth import (
    THRESHOLD,
    GroundTruth,
    PatchBatch,
    PositionTables,
    RetrievalTruth,
    batch_checksum,
)
from mechscope.models.zoo.recipes import Recipe
from mechscope.probes import Apply, Intervention, Tracer, Zero, intervene, trace
from mechscope.probes.trace import Trace
from mechscope.tasks.base import TaskBatch
from mechscope.tasks.induction import induction
from mechscope.types import Model

log = logging.getLogger(__name__)

CIRCUIT_RULE = (
    f"a head (layer, head) is a circuit head when patching its output alone (all positions) changes "
    f"the normalised logit difference by >= {THRESHOLD} of the clean-corrupt gap (absolute value) in "
    f"either patching direction: denoising (clean head output into the corrupt run) or noising "
    f"(corrupt output into the clean run). MLP layers use the same rule on mlp_out."
)
RETRIEVAL_DROP = 0.1
RETRIEVAL_RULE = (
    f"retrieval heads, by ablation of where a head looks at the answer position (its attention "
    f"pattern there made uniform over the keys it can see): a head is a retrieval head when that "
    f"ablation of the head alone costs >= {RETRIEVAL_DROP} top-1 accuracy (necessary), or when "
    f"keeping the head intact while every other head is so ablated gains >= {RETRIEVAL_DROP} over "
    f"ablating all heads (sufficient: two redundant copy heads each fail the first test). Zero "
    f"ablation of the head's output at the answer position is reported beside it. The copy score "
    f"is a reported detector score, not the rule."
)
LOCAL_MIN = 0.5
LOCAL_RULE = (
    f"local (streaming) heads: mean attention mass on the last 4 keys >= {LOCAL_MIN}, or (retrieval) "
    f"attention from the needle's value to its key (key_tag score) >= {LOCAL_MIN}"
)
METRIC = "logit_diff(answer - corrupt_answer) at answer_pos, normalised by the clean-corrupt gap"
#: Tokens per stacked forward of patched variants (bounds memory).
MAX_TOKENS = 4096

Heads = Sequence[tuple[int, int]]
Variant = tuple[str, int, int | None, int | None]  # site, layer, head (None: all), pos (None: all)


# --------------------------------------------------------------------------------------------
# accuracy and ablation


@torch.no_grad()
def accuracy(
    model: Model, batches: Sequence[TaskBatch],
    interventions: Callable[[TaskBatch], Sequence[Intervention]] | Sequence[Intervention] = (),
) -> float:  # fmt: skip
    """Top-1 accuracy over ``batches`` (rows weighted equally), under optional interventions
    (a list, or a function of the batch for per-row positions)."""
    right = total = 0.0
    for b in batches:
        specs = interventions(b) if callable(interventions) else interventions
        with intervene(model, list(specs)):
            right += b.accuracy(model(b.clean)) * b.batch_size
        total += b.batch_size
    return right / total


def dead_heads(model: Model) -> set[tuple[int, int]]:
    """Heads whose ``W_O`` is exactly zero (pruned): changing their attention changes nothing."""
    return {(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)
            if not bool(model.blocks[layer].attn.W_O[h].detach().any())}  # fmt: skip


# --------------------------------------------------------------------------------------------
# head scores


@torch.no_grad()
def detector_scores(model: Model, *, n: int = 8, seed: int = 0) -> dict[str, list[list[float]]]:
    """Previous-token and induction scores per head (TransformerLens head_detector pieces)."""
    from transformer_lens.head_detector import (
        compute_head_attention_similarity_score,
        get_induction_head_detection_pattern,
        get_previous_token_head_detection_pattern,
    )

    cfg = model.cfg
    rep = max(3, min(20, (cfg.n_ctx - 2) // 2))
    b = induction(n, seq_len=rep, d_vocab=cfg.d_vocab, seed=seed)
    rows = torch.cat([b.clean, b.answer[:, None]], dim=1)  # [BOS] R R
    tr = trace(model, rows, sites=("patterns",), batch_size=n, progress=False)
    out = {"previous_token": np.zeros((cfg.n_layers, cfg.n_heads)),
           "induction": np.zeros((cfg.n_layers, cfg.n_heads))}  # fmt: skip
    makers = {"previous_token": get_previous_token_head_detection_pattern,
              "induction": get_induction_head_detection_pattern}  # fmt: skip
    for i in range(n):
        for kind, make in makers.items():
            det = make(rows[i : i + 1].cpu())
            keep = (det.sum(-1) > 0).to(torch.float32)[:, None]  # query rows with a target
            for layer in range(cfg.n_layers):
                pat = tr.pattern(layer)[i].float().cpu()  # [head, query, key]
                for h in range(cfg.n_heads):
                    out[kind][layer, h] += compute_head_attention_similarity_score(
                        pat[h] * keep, det, exclude_bos=False, exclude_current_token=False,
                        error_measure="mul") / n  # fmt: skip
    return {k: v.round(4).tolist() for k, v in out.items()}


@torch.no_grad()
def copy_and_local_scores(model: Model, batches: Sequence[TaskBatch]) -> dict[str, list[list[float]]]:
    """Copy (retrieval) score and local-attention score per head, on the task's own rows."""
    cfg = model.cfg
    copied = np.zeros((cfg.n_layers, cfg.n_heads))
    local = np.zeros((cfg.n_layers, cfg.n_heads))
    tag = np.zeros((cfg.n_layers, cfg.n_heads))
    n_right = n_rows = 0
    with Tracer(model, sites=("patterns",), batch_size=max(b.batch_size for b in batches)) as t:
        for b in batches:
            logits, tr = t.forward(b.clean)
            right = (b.answer_logits(logits).argmax(-1) == b.answer).cpu()
            rows = torch.arange(b.batch_size)
            for layer in range(cfg.n_layers):
                pat = tr.pattern(layer).float().cpu()  # [batch, head, q, k]
                top = pat[rows, :, b.answer_pos].argmax(-1)  # [batch, head]
                hit = (b.clean[rows[:, None], top] == b.answer[:, None]) & (
                    top < b.answer_pos[:, None])
                copied[layer] += (hit & right[:, None]).sum(0).numpy()
                q = torch.arange(pat.shape[-2])
                k = torch.arange(pat.shape[-1])
                near = ((q[:, None] - k[None, :]) < 4) & (k[None, :] <= q[:, None])
                local[layer] += ((pat * near).sum(-1).mean(-1)).sum(0).numpy()
                if "needle_start" in b.meta:  # retrieval: from the needle's value to its key
                    key_at = torch.as_tensor(b.meta["needle_start"])
                    tag[layer] += pat[rows, :, key_at + 1, key_at].sum(0).numpy()
            n_right += int(right.sum())
            n_rows += b.batch_size
    out = {"copy": (copied / max(1, n_right)).round(4).tolist(),
           "local": (local / n_rows).round(4).tolist()}  # fmt: skip
    if tag.any():
        out["key_tag"] = (tag / n_rows).round(4).tolist()
    return out


# --------------------------------------------------------------------------------------------
# patching


def _forward(model: Model, tokens: Tensor, sites: tuple[str, ...]) -> tuple[Tensor, Trace]:
    with Tracer(model, sites=sites, batch_size=len(tokens)) as t:
        return t.forward(tokens)


def _selection(src: Tensor, head: int | None, pos: int | None) -> tuple[Any, ...]:
    """Index of one variant's selection in a ``[batch, pos, (head,) ...]`` activation."""
    idx: tuple[Any, ...] = (slice(None), slice(None) if pos is None else pos)
    return idx + ((slice(None) if head is None else head,) if src.ndim == 4 else ())


def _where(mask: Tensor, source: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda act: torch.where(mask, source, act)


@torch.no_grad()
def patched_logit_diffs(
    model: Model, batch: TaskBatch, tokens: Tensor, source: Trace, variants: Sequence[Variant],
    *, max_tokens: int = MAX_TOKENS,
) -> Tensor:  # fmt: skip
    """Mean logit difference of ``tokens`` run once per variant with ``source``'s activation
    written at the variant's site, layer, head and position; ``[len(variants)]``, float32.

    Variants are stacked along the batch (``max_tokens`` tokens per forward); each stacked copy
    gets its own selection mask, applied with ``torch.where`` (untouched entries bit for bit).
    """
    b, t = tokens.shape
    per = max(1, max_tokens // (b * t))
    out = []
    for start in range(0, len(variants), per):
        chunk = variants[start : start + per]
        k = len(chunk)
        specs: list[Intervention] = []
        for site, layer in dict.fromkeys((s, ly) for s, ly, _, _ in chunk):
            src = source.get(site, layer)  # [b, pos, (head,) d]
            mask = torch.zeros(k, *src.shape[:-1], 1, dtype=torch.bool, device=src.device)
            for j, (s, ly, head, pos) in enumerate(chunk):
                if (s, ly) == (site, layer):
                    mask[(j, *_selection(src, head, pos))] = True
            stacked = src.repeat(k, *([1] * (src.ndim - 1)))
            specs.append(Apply(site=site, layer=layer, fn=_where(mask.flatten(0, 1), stacked)))
        with intervene(model, specs):
            logits = model(tokens.repeat(k, 1))
        ld = logit_diff(logits, batch.answer.repeat(k), batch.corrupt_answer.repeat(k),
                        batch.answer_pos.repeat(k))  # fmt: skip
        out.append(ld.view(k, b).mean(1))
    return torch.cat(out) if out else torch.zeros(0)


def _is_noop(batch: TaskBatch, clean: Trace, corrupt: Trace, v: Variant) -> bool:
    """A patch that writes the value already there, or acts after the scored position."""
    site, layer, head, pos = v
    if pos is not None and pos > int(batch.answer_pos.max()):
        return True
    a, b = clean.get(site, layer), corrupt.get(site, layer)
    idx = _selection(a, head, pos)
    return torch.equal(a[idx], b[idx])


def _mean_ld(batch: TaskBatch, logits: Tensor) -> Tensor:
    return logit_diff(logits, batch.answer, batch.corrupt_answer, batch.answer_pos).mean()


def _normalise(lds: Tensor, ld_clean: Tensor, ld_corrupt: Tensor, direction: Direction) -> Tensor:
    """denoise: (LD - LD_corrupt) / gap; noise: (LD_clean - LD) / gap (exact at the end points)."""
    return torch.as_tensor(normalised_patching(lds, ld_clean, ld_corrupt, direction))


def patching_metric(
    batch: TaskBatch, clean_logits: Tensor, corrupt_logits: Tensor, direction: Direction
) -> Callable[[Tensor], Tensor]:
    """The normalised metric of a patched run's logits ``[batch, pos, vocab]``, as the tables
    use it: 0 on the corrupt logits and 1 on the clean ones for ``denoise``, the reverse for
    ``noise``."""
    ld_clean, ld_corrupt = _mean_ld(batch, clean_logits), _mean_ld(batch, corrupt_logits)
    return lambda logits: _normalise(_mean_ld(batch, logits), ld_clean, ld_corrupt, direction)


@torch.no_grad()
def patching_effects(
    model: Model, batch: TaskBatch, variants: Sequence[Variant], direction: Direction
) -> np.ndarray:
    """Normalised effects of single patches, every variant run (no no-op shortcut).

    A variant is ``(site, layer, head or None, position or None)``; None selects every head or
    position. ``denoise`` writes the clean run's activation into the corrupt run, ``noise`` the
    corrupt run's into the clean run.
    """
    sites = tuple(dict.fromkeys(v[0] for v in variants))
    clean_logits, clean = _forward(model, batch.clean, sites)
    corrupt_logits, corrupt = _forward(model, batch.corrupt, sites)
    tokens, source = (batch.corrupt, clean) if direction == "denoise" else (batch.clean, corrupt)
    lds = patched_logit_diffs(model, batch, tokens, source, variants)
    ld_clean, ld_corrupt = _mean_ld(batch, clean_logits), _mean_ld(batch, corrupt_logits)
    return _normalise(lds, ld_clean, ld_corrupt, direction).double().numpy()


@torch.no_grad()
def patching_tables(model: Model, batch: TaskBatch, *, by_position: bool = True) -> dict[str, Any]:
    """Patching effects of one batch, both directions (module docstring); numpy arrays.

    Keys: ``clean_logit_diff``, ``corrupt_logit_diff``; ``head_{d}`` ``[layer, head]``,
    ``mlp_{d}`` ``[layer]``; with ``by_position``: ``head_pos_{d}`` ``[layer, pos, head]``,
    ``resid_pre_{d}`` ``[layer, pos]``, ``mlp_pos_{d}`` ``[layer, pos]``, for ``d`` in
    ``denoise``, ``noise``. MLP keys only for models with MLPs.
    """
    cfg = model.cfg
    n_layers, n_heads, n_pos = int(cfg.n_layers), int(cfg.n_heads), batch.seq_len
    has_mlp = not cfg.attn_only
    sites = ("heads", "resid_pre") + (("mlp_out",) if has_mlp else ())
    clean_logits, clean = _forward(model, batch.clean, sites)
    corrupt_logits, corrupt = _forward(model, batch.corrupt, sites)
    ld_clean, ld_corrupt = _mean_ld(batch, clean_logits), _mean_ld(batch, corrupt_logits)
    layers, heads, positions = range(n_layers), range(n_heads), range(n_pos)
    variants: dict[str, list[Variant]] = {
        "head": [("heads", ly, h, None) for ly in layers for h in heads],
        "mlp": [("mlp_out", ly, None, None) for ly in layers] if has_mlp else [],
    }
    shapes: dict[str, tuple[int, ...]] = {"head": (n_layers, n_heads), "mlp": (n_layers,)}
    if by_position:
        variants["head_pos"] = [("heads", ly, h, p) for ly in layers for p in positions
                                for h in heads]  # fmt: skip
        variants["resid_pre"] = [("resid_pre", ly, None, p) for ly in layers for p in positions]
        variants["mlp_pos"] = ([("mlp_out", ly, None, p) for ly in layers for p in positions]
                               if has_mlp else [])  # fmt: skip
        shapes |= {"head_pos": (n_layers, n_pos, n_heads), "resid_pre": (n_layers, n_pos),
                   "mlp_pos": (n_layers, n_pos)}  # fmt: skip
    out: dict[str, Any] = {"clean_logit_diff": float(ld_clean),
                           "corrupt_logit_diff": float(ld_corrupt)}  # fmt: skip
    ok = abs(float(ld_clean - ld_corrupt)) >= MIN_GAP
    runs: tuple[tuple[Direction, Tensor, Trace], ...] = (("denoise", batch.corrupt, clean),
                                                         ("noise", batch.clean, corrupt))
    for direction, tokens, source in runs:
        run = [v for vs in variants.values() for v in vs
               if ok and not _is_noop(batch, clean, corrupt, v)]  # fmt: skip
        lds = patched_logit_diffs(model, batch, tokens, source, run)
        eff = _normalise(lds, ld_clean, ld_corrupt, direction) if ok else torch.zeros(0)
        found = dict(zip(run, eff.double().tolist(), strict=True))
        for name, vs in variants.items():
            if vs:
                table = np.array([found.get(v, 0.0) for v in vs]).reshape(shapes[name])
                out[f"{name}_{direction}"] = table
    if not ok:
        log.warning("clean and corrupt logit differences are equal; patching effects set to 0")
    return out


def circuit_from_tables(head_denoise: Any, head_noise: Any, mlp_denoise: Any = None,
                        mlp_noise: Any = None) -> tuple[list[tuple[int, int]], list[int]]:
    """Circuit heads and MLP layers by :data:`CIRCUIT_RULE`."""
    eff = np.maximum(np.abs(head_denoise), np.abs(head_noise))
    heads = [(int(layer), int(h)) for layer, h in zip(*np.nonzero(eff >= THRESHOLD), strict=True)]
    mlps: list[int] = []
    if mlp_denoise is not None:
        m = np.maximum(np.abs(mlp_denoise), np.abs(mlp_noise))
        mlps = [int(i) for i in np.nonzero(m >= THRESHOLD)[0]]
    return heads, mlps


# --------------------------------------------------------------------------------------------
# retrieval heads


def retrieval_ablation(
    model: Model, batches: Sequence[TaskBatch], scores: dict[str, list[list[float]]],
    circuit: Heads, *, seed: int = 0, draws: int = 5,
) -> RetrievalTruth:  # fmt: skip
    """Retrieval heads by :data:`RETRIEVAL_RULE`, with the accuracies that decide them.

    Pruned heads (:func:`dead_heads`) are skipped: their output is exactly zero, so ablating them
    changes nothing (their accuracies are the unablated ones, exactly). "Random other heads"
    exclude the circuit, retrieval and local heads, which the mechanism needs (the patching
    corruption, a changed value, leaves the keys and so the key-tagging local heads unchanged).
    """
    cfg = model.cfg
    grid = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    dead = dead_heads(model)
    live = [g for g in grid if g not in dead]

    def at_answer(heads: Heads) -> Callable[[TaskBatch], list[Intervention]]:
        return lambda b: uniform_attention(heads, b.answer_pos[:, None])

    def zero_at_answer(layer: int, head: int) -> Callable[[TaskBatch], list[Intervention]]:
        return lambda b: [Zero(site="heads", layer=layer, heads=(head,),
                               positions=b.answer_pos[:, None])]  # fmt: skip

    base = round(accuracy(model, batches), 4)
    every = round(accuracy(model, batches, at_answer(live)), 4)
    shape = (cfg.n_layers, cfg.n_heads)
    alone, all_but, zero = np.full(shape, base), np.full(shape, every), np.full(shape, base)
    for layer, h in live:
        alone[layer, h] = round(accuracy(model, batches, at_answer([(layer, h)])), 4)
        others = [g for g in live if g != (layer, h)]
        all_but[layer, h] = round(accuracy(model, batches, at_answer(others)), 4)
        zero[layer, h] = round(accuracy(model, batches, zero_at_answer(layer, h)), 4)
    ret = [(a, b) for a, b in grid if base - alone[a, b] >= RETRIEVAL_DROP - 1e-9
           or all_but[a, b] - every >= RETRIEVAL_DROP - 1e-9]  # fmt: skip
    local = [(a, b) for a, b in grid if scores["local"][a][b] >= LOCAL_MIN
             or scores.get("key_tag", scores["local"])[a][b] >= LOCAL_MIN]  # fmt: skip
    skip = {tuple(h) for h in circuit} | set(ret) | set(local)
    others = [g for g in grid if g not in skip]

    def uniform_acc(heads: Heads) -> float:
        alive = [g for g in heads if g not in dead]
        return base if not alive else round(accuracy(model, batches, uniform_attention(alive)), 4)

    rng = np.random.default_rng(seed)
    random_acc = []
    for _ in range(draws if ret and len(others) >= len(ret) else 0):
        pick = [others[i] for i in rng.choice(len(others), size=len(ret), replace=False)]
        random_acc.append(uniform_acc(pick))
    return RetrievalTruth(
        heads=tuple(ret), rule=RETRIEVAL_RULE, baseline=base, uniform_alone=alone,
        uniform_all_but=all_but, uniform_all=every, zero_alone=zero, local_heads=tuple(local),
        local_rule=LOCAL_RULE, heads_uniform=uniform_acc(ret) if ret else None,
        random_other_heads_uniform=tuple(random_acc),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# everything


def _r(a: Any, d: int = 6) -> Any:
    return np.round(np.asarray(a, dtype=np.float64), d)


def compute_ground_truth(model: Model, recipe: Recipe, *, small: bool = False) -> GroundTruth:
    """Measure everything stored in ``ground_truth.json`` (``small``: tiny samples and no
    per-position tables for retrieval, for quick tests).

    The all-position tables average over every third patch batch (for retrieval: depths 0, 0.3,
    0.6, 0.9); per-position tables are computed on each of those batches, except for the
    256-token retrieval task, where one batch (depth 0.6) is enough and keeps the cost down.
    """
    n = 16 if small else recipe.eval_n
    batches = EVAL_BATCHES[recipe.task](recipe, n, recipe.eval_seed)
    by_batch = [round(accuracy(model, [b]), 4) for b in batches]
    acc = sum(a * b.batch_size for a, b in zip(by_batch, batches, strict=True)) / sum(
        b.batch_size for b in batches)
    scores = detector_scores(model, n=2 if small else 8, seed=recipe.eval_seed)
    scores.update(copy_and_local_scores(model, batches))
    patch_n, patch_seed = (16 if small else 64), recipe.eval_seed + 1
    patch_batches = PATCH_BATCHES[recipe.task](recipe, patch_n, patch_seed)
    chosen = list(range(0, len(patch_batches), max(1, len(patch_batches) // 3)))
    per_pos = [chosen[len(chosen) // 2]] if recipe.task == "retrieval" else chosen
    if small and recipe.task == "retrieval":
        per_pos = []  # 256 tokens x every live head of an untrained model: minutes, not seconds
    specs, tables = [], []
    for i in chosen:
        b = patch_batches[i]
        specs.append(PatchBatch(recipe=recipe.name, task=recipe.task, n=patch_n, seed=patch_seed,
                                index=i, shape=(b.batch_size, b.seq_len), sha1=batch_checksum(b)))
        tables.append(patching_tables(model, b, by_position=i in per_pos))

    def mean(key: str) -> Any:
        return _r(np.mean([t[key] for t in tables], axis=0)) if key in tables[0] else None

    by_position = tuple(
        PositionTables(batch=spec, clean_logit_diff=round(t["clean_logit_diff"], 6),
                       corrupt_logit_diff=round(t["corrupt_logit_diff"], 6),
                       head_denoise=_r(t["head_pos_denoise"]), head_noise=_r(t["head_pos_noise"]),
                       resid_pre_denoise=_r(t["resid_pre_denoise"]),
                       resid_pre_noise=_r(t["resid_pre_noise"]),
                       mlp_denoise=_r(t["mlp_pos_denoise"]) if "mlp_pos_denoise" in t else None,
                       mlp_noise=_r(t["mlp_pos_noise"]) if "mlp_pos_noise" in t else None)
        for spec, t in zip(specs, tables, strict=True) if "head_pos_denoise" in t
    )  # fmt: skip
    head_denoise, head_noise = mean("head_denoise"), mean("head_noise")
    mlp_denoise, mlp_noise = mean("mlp_denoise"), mean("mlp_noise")
    heads, mlps = circuit_from_tables(head_denoise, head_noise, mlp_denoise, mlp_noise)
    from mechscope.models.zoo.train import head_group_norms

    norms = np.round(head_group_norms(model).detach().double().numpy(), 3)
    retrieval = None
    if recipe.task == "retrieval":
        retrieval = retrieval_ablation(model, batches, scores, heads, seed=recipe.eval_seed)
    skipped = (f"per-position tables: an entry whose patch writes the value already there (clean "
               f"and corrupt activations equal bit for bit, e.g. before the first corrupted "
               f"token) or acts after the scored position is exactly 0 and was not run; computed "
               f"on batches {[t.batch.index for t in by_position]} of {len(patch_batches)}")
    return GroundTruth(
        name=recipe.name, task=recipe.task, accuracy=round(acc, 4),
        accuracy_by_batch=tuple(by_batch), n_eval=sum(b.batch_size for b in batches),
        eval_seed=recipe.eval_seed, head_scores={k: np.asarray(v) for k, v in scores.items()},
        metric=METRIC, corruption=PATCH_CORRUPTION[recipe.task], batches=tuple(specs),
        clean_logit_diff=round(float(np.mean([t["clean_logit_diff"] for t in tables])), 6),
        corrupt_logit_diff=round(float(np.mean([t["corrupt_logit_diff"] for t in tables])), 6),
        head_denoise=head_denoise, head_noise=head_noise, mlp_denoise=mlp_denoise,
        mlp_noise=mlp_noise, by_position=by_position, circuit_heads=tuple(heads),
        circuit_mlps=tuple(mlps), circuit_rule=CIRCUIT_RULE, head_norms=norms, retrieval=retrieval,
        notes={"patching": "all-position tables: mean over the batches listed; " + skipped},
    )  # fmt: skip


def ground_truth(model: Model, recipe: Recipe, *, small: bool = False) -> dict[str, Any]:
    """:func:`compute_ground_truth` as the ``ground_truth.json`` dict (what ``train`` writes)."""
    return compute_ground_truth(model, recipe, small=small).to_dict()


__all__ = ["CIRCUIT_RULE", "LOCAL_RULE", "RETRIEVAL_RULE", "THRESHOLD", "GroundTruth", "accuracy",
           "circuit_from_tables", "compute_ground_truth", "copy_and_local_scores", "dead_heads",
           "detector_scores", "ground_truth", "patched_logit_diffs", "patching_effects",
           "patching_metric", "patching_tables",
           "retrieval_ablation", "uniform_attention"]  # fmt: skip
