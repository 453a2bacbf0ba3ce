"""Ground truth of a zoo checkpoint: accuracy, per-head scores, and an exhaustive patching table.

What is measured (all on fresh seeded samples, never on training rows):

- accuracy: top-1 at each row's ``answer_pos`` over the task's evaluation batches.
- previous-token and induction scores: TransformerLens's own detection patterns
  (``head_detector.get_previous_token_head_detection_pattern`` / ``..._induction_...``) and its
  ``compute_head_attention_similarity_score`` ("mul": the fraction of a head's attention that lands
  where the pattern says), on ``[BOS] R R`` rows of random tokens. ``head_detector.detect_head``
  itself calls ``model.to_tokens`` and so refuses a bridge without a tokenizer (all zoo models);
  we call the same pieces on the cached patterns instead. Query rows where the pattern is empty
  (the first copy for induction, BOS for previous-token) are left out, so a perfect head scores 1
  (the raw ``detect_head`` number on ``[BOS] R R`` is capped near 0.5 for induction heads).
- copy (retrieval) score, after Wu et al. 2024: for every correctly answered row, does the head's
  argmax attention from ``answer_pos`` land on an earlier position holding the answer token?
  score = fraction of such rows. Local score: attention mass on the last 4 keys (streaming heads).
  Key-tag score (retrieval): attention from the needle's value to the needle's key, the step that
  lets a copy head find the value by its key.
- head norms: the L2 norm of each head's parameters (0 = a dead head; see ``Recipe.head_l1``).
- patching, on clean/corrupt pairs (``data.PATCH_BATCHES``; for induction the corrupt row permutes
  the first copy, so previous-token heads show up too): TransformerLens
  ``patching.get_act_patch_attn_head_out_all_pos`` (every head, all
  positions) and ``generic_activation_patch`` on ``mlp_out`` (every MLP layer, all positions; plus
  ``get_act_patch_mlp_out`` by position), in both directions, with the logit difference
  (answer - corrupt answer) normalised by the clean/corrupt gap:
  denoise = (LD(corrupt run + clean act) - LD_corrupt) / gap; noise = (LD_clean - LD(clean run +
  corrupt act)) / gap. 1 = the component alone restores (denoise) or destroys (noise) the behaviour.

Circuit rule (:data:`CIRCUIT_RULE`): a head is a circuit head when patching it alone moves the
normalised logit difference by at least ``THRESHOLD`` in either direction.

Caveat: head scores on ``[BOS] R R`` use random ids from the whole vocabulary, which for the
structured vocabularies of retrieval/facts/ioi is off-distribution; the copy score and the
patching table are measured on each model's own task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mechscope.models.zoo.data import EVAL_BATCHES, PATCH_BATCHES, PATCH_CORRUPTION
from mechscope.models.zoo.recipes import Recipe
from mechscope.probes.hooks import hooked
from mechscope.tasks.base import TaskBatch
from mechscope.tasks.induction import induction

log = logging.getLogger(__name__)

THRESHOLD = 0.2
CIRCUIT_RULE = (
    f"a head (layer, head) is a circuit head when patching its output alone (all positions) changes "
    f"the normalised logit difference by >= {THRESHOLD} of the clean-corrupt gap (absolute value) in "
    f"either patching direction: denoising (clean head "
    f"output into the corrupt run, TransformerLens get_act_patch_attn_head_out_all_pos) or noising "
    f"(corrupt output into the clean run). MLP layers use the same rule on mlp_out."
)
RETRIEVAL_RULE = "retrieval heads: copy score > 0.1 (Wu et al. 2024)"
LOCAL_MIN = 0.5
LOCAL_RULE = (
    f"local (streaming) heads: mean attention mass on the last 4 keys >= {LOCAL_MIN}, or (retrieval) "
    f"attention from the needle's value to its key (key_tag score) >= {LOCAL_MIN}"
)

Heads = Sequence[tuple[int, int]]


# --------------------------------------------------------------------------------------------
# accuracy and ablation


@torch.no_grad()
def accuracy(model: Any, batches: Sequence[TaskBatch], fwd_hooks: Sequence[Any] = ()) -> float:
    """Top-1 accuracy over ``batches`` (rows weighted equally), under optional hooks."""
    right = total = 0.0
    with hooked(model, list(fwd_hooks)):
        for b in batches:
            right += b.accuracy(model(b.clean)) * b.batch_size
            total += b.batch_size
    return right / total


def uniform_attention_hooks(heads: Heads) -> list[tuple[str, Any]]:
    """Hooks that make each head's attention uniform over the keys each query can see (causal).

    >>> [name for name, _ in uniform_attention_hooks([(1, 0), (1, 2), (0, 3)])]
    ['blocks.0.attn.hook_pattern', 'blocks.1.attn.hook_pattern']
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))

    def make(hs: list[int]) -> Any:
        def fn(pattern: torch.Tensor, hook: Any) -> torch.Tensor:  # [batch, head, query, key]
            q, k = pattern.shape[-2:]
            causal = torch.ones(q, k, dtype=pattern.dtype, device=pattern.device).tril()
            uniform = causal / causal.sum(-1, keepdim=True)
            out = pattern.clone()
            out[:, hs] = uniform
            return out

        return fn

    return [
        (f"blocks.{layer}.attn.hook_pattern", make(hs)) for layer, hs in sorted(by_layer.items())
    ]


# --------------------------------------------------------------------------------------------
# head scores


@torch.no_grad()
def detector_scores(model: Any, *, n: int = 8, seed: int = 0) -> dict[str, list[list[float]]]:
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
    out = {"previous_token": np.zeros((cfg.n_layers, cfg.n_heads)),
           "induction": np.zeros((cfg.n_layers, cfg.n_heads))}  # fmt: skip
    makers = {"previous_token": get_previous_token_head_detection_pattern,
              "induction": get_induction_head_detection_pattern}  # fmt: skip
    for i in range(n):
        _, cache = model.run_with_cache(rows[i : i + 1])
        for kind, make in makers.items():
            det = make(rows[i : i + 1].cpu())
            keep = (det.sum(-1) > 0).to(torch.float32)[:, None]  # query rows with a target
            for layer in range(cfg.n_layers):
                pat = cache[f"blocks.{layer}.attn.hook_pattern"][0].float().cpu()
                for h in range(cfg.n_heads):
                    out[kind][layer, h] += compute_head_attention_similarity_score(
                        pat[h] * keep, det, exclude_bos=False, exclude_current_token=False,
                        error_measure="mul") / n  # fmt: skip
    return {k: v.round(4).tolist() for k, v in out.items()}


@torch.no_grad()
def copy_and_local_scores(model: Any, batches: Sequence[TaskBatch]) -> dict[str, list[list[float]]]:
    """Copy (retrieval) score and local-attention score per head, on the task's own rows."""
    cfg = model.cfg
    copied = np.zeros((cfg.n_layers, cfg.n_heads))
    local = np.zeros((cfg.n_layers, cfg.n_heads))
    tag = np.zeros((cfg.n_layers, cfg.n_heads))
    n_right = n_rows = 0
    for b in batches:
        logits, cache = model.run_with_cache(b.clean)
        right = (b.answer_logits(logits).argmax(-1) == b.answer).cpu()
        rows = torch.arange(b.batch_size)
        for layer in range(cfg.n_layers):
            pat = cache[f"blocks.{layer}.attn.hook_pattern"].float().cpu()  # [batch, head, q, k]
            at = pat[rows, :, b.answer_pos]  # [batch, head, key]
            top = at.argmax(-1)  # [batch, head]
            hit = (b.clean[rows[:, None], top] == b.answer[:, None]) & (top < b.answer_pos[:, None])
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


def _replace_all(corrupted: torch.Tensor, index: Any, clean: torch.Tensor) -> torch.Tensor:
    corrupted[...] = clean
    return corrupted


@torch.no_grad()
def patching_tables(model: Any, batch: TaskBatch) -> dict[str, Any]:
    """Per-head (and per-MLP) activation-patching effects with TransformerLens ``patching``."""
    from transformer_lens import patching

    clean_logits, clean_cache = model.run_with_cache(batch.clean)
    corrupt_logits, corrupt_cache = model.run_with_cache(batch.corrupt)
    ld_clean = float(batch.logit_diff(clean_logits).mean())
    ld_corrupt = float(batch.logit_diff(corrupt_logits).mean())
    gap = ld_clean - ld_corrupt if abs(ld_clean - ld_corrupt) > 1e-6 else 1e-6

    def denoise(logits: torch.Tensor) -> torch.Tensor:
        return (batch.logit_diff(logits).mean() - ld_corrupt) / gap

    def noise(logits: torch.Tensor) -> torch.Tensor:
        return (ld_clean - batch.logit_diff(logits).mean()) / gap

    table: dict[str, Any] = {
        "metric": "logit_diff(answer - corrupt_answer) at answer_pos, normalised by the gap",
        "n": batch.batch_size, "seed": batch.seed,
        "clean_logit_diff": round(ld_clean, 4), "corrupt_logit_diff": round(ld_corrupt, 4),
    }  # fmt: skip
    heads = patching.get_act_patch_attn_head_out_all_pos
    table["head_out_denoise"] = heads(model, batch.corrupt, clean_cache, denoise)
    table["head_out_noise"] = heads(model, batch.clean, corrupt_cache, noise)
    if not model.cfg.attn_only:
        for name, tokens, cache, fn in (("denoise", batch.corrupt, clean_cache, denoise),
                                        ("noise", batch.clean, corrupt_cache, noise)):  # fmt: skip
            table[f"mlp_out_{name}"] = patching.generic_activation_patch(
                model, tokens, cache, fn, patch_setter=_replace_all,  # type: ignore[arg-type]
                activation_name="mlp_out", index_axis_names=("layer",))  # fmt: skip
            table[f"mlp_out_by_pos_{name}"] = patching.get_act_patch_mlp_out(
                model, tokens, cache, fn
            )
    return {k: (v.double().round(decimals=4).tolist() if torch.is_tensor(v) else v)
            for k, v in table.items()}  # fmt: skip


def circuit_from_table(table: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
    """Circuit heads and MLP layers by :data:`CIRCUIT_RULE`."""
    eff = np.maximum(np.abs(table["head_out_denoise"]), np.abs(table["head_out_noise"]))
    heads = [[int(layer), int(h)] for layer, h in zip(*np.nonzero(eff >= THRESHOLD), strict=True)]
    mlps: list[int] = []
    if "mlp_out_denoise" in table:
        m = np.maximum(np.abs(table["mlp_out_denoise"]), np.abs(table["mlp_out_noise"]))
        mlps = [int(i) for i in np.nonzero(m >= THRESHOLD)[0]]
    return heads, mlps


# --------------------------------------------------------------------------------------------


def ground_truth(model: Any, recipe: Recipe, *, small: bool = False) -> dict[str, Any]:
    """Everything stored in ``ground_truth.json`` (``small``: tiny samples, for quick tests)."""
    n = 16 if small else recipe.eval_n
    batches = EVAL_BATCHES[recipe.task](recipe, n, recipe.eval_seed)
    acc = accuracy(model, batches)
    scores = detector_scores(model, n=2 if small else 8, seed=recipe.eval_seed)
    scores.update(copy_and_local_scores(model, batches))
    patch_batches = PATCH_BATCHES[recipe.task](recipe, 16 if small else 64, recipe.eval_seed + 1)
    tables = [patching_tables(model, b) for b in patch_batches[:: max(1, len(patch_batches) // 3)]]
    table = _mean_tables(tables)
    table["corruption"] = PATCH_CORRUPTION[recipe.task]
    heads, mlps = circuit_from_table(table)
    truth: dict[str, Any] = {
        "name": recipe.name, "task": recipe.task, "n_eval": sum(b.batch_size for b in batches),
        "eval_seed": recipe.eval_seed, "accuracy": round(acc, 4),
        "accuracy_by_batch": [round(accuracy(model, [b]), 4) for b in batches],
        "head_scores": scores, "patching": table,
        "circuit_heads": heads, "circuit_mlps": mlps, "circuit_rule": CIRCUIT_RULE,
    }  # fmt: skip
    from mechscope.models.zoo.train import head_group_norms

    norms = head_group_norms(model).detach().tolist()
    truth["head_norms"] = [[round(float(v), 3) for v in row] for row in norms]
    if recipe.task == "retrieval":
        truth.update(retrieval_ablation(model, batches, scores, heads, seed=recipe.eval_seed))
    return truth


def _mean_tables(tables: list[dict[str, Any]]) -> dict[str, Any]:
    if len(tables) == 1:
        return tables[0]
    out = dict(tables[0])
    out["n"] = sum(t["n"] for t in tables)
    out["note"] = f"mean over {len(tables)} evaluation batches (e.g. depths for retrieval)"
    for k, v in tables[0].items():
        if isinstance(v, list) or k.endswith("logit_diff"):
            arrs = [np.asarray(t[k]) for t in tables]
            if all(a.shape == arrs[0].shape for a in arrs):
                out[k] = np.round(np.mean(arrs, axis=0), 4).tolist()
            else:  # by-position tables of rows of different lengths: one table per batch
                out[k] = [t[k] for t in tables]
    return out


def retrieval_ablation(
    model: Any, batches: Sequence[TaskBatch], scores: dict[str, list[list[float]]],
    circuit: list[list[int]], *, seed: int = 0, draws: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Accuracy with the retrieval heads' attention made uniform, and with random other heads.

    "Other" heads exclude the circuit heads, the retrieval heads and the local (streaming) heads,
    which the mechanism also needs: the patching corruption (a changed value) leaves the keys,
    and so the local heads that tag values with their keys, unchanged.
    """
    cfg = model.cfg
    grid = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    ret = [(a, b) for a, b in grid if scores["copy"][a][b] > 0.1]
    local = [(a, b) for a, b in grid if scores["local"][a][b] >= LOCAL_MIN
             or scores.get("key_tag", scores["local"])[a][b] >= LOCAL_MIN]  # fmt: skip
    skip = {tuple(h) for h in circuit} | set(ret) | set(local)
    others = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)
              if (layer, h) not in skip]  # fmt: skip
    rng = np.random.default_rng(seed)
    random_acc = []
    for _ in range(draws if ret and len(others) >= len(ret) else 0):
        pick = [others[i] for i in rng.choice(len(others), size=len(ret), replace=False)]
        random_acc.append(round(accuracy(model, batches, uniform_attention_hooks(pick)), 4))
    return {
        "retrieval_heads": [list(h) for h in ret], "retrieval_rule": RETRIEVAL_RULE,
        "local_heads": [list(h) for h in local], "local_rule": LOCAL_RULE,
        "ablation": {"retrieval_heads_uniform": round(accuracy(model, batches,
                     uniform_attention_hooks(ret)), 4) if ret else None,
                     "random_other_heads_uniform": random_acc},
    }  # fmt: skip
