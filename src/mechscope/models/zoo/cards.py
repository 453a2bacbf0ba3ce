"""Model cards of zoo checkpoints: ``card.json`` (for code) and ``card.md`` (for people).

The card is written from the recipe and the measured ground truth, never by hand, so it cannot
drift from the checkpoint: task, description, accuracy, circuit heads and the rule that picked
them, the mechanism, how it was verified, the full recipe with its seed, training time and size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mechscope.models.zoo.groundtruth import GroundTruth
from mechscope.models.zoo.recipes import Recipe


def _top(matrix: list[list[float]], k: int = 3) -> list[tuple[int, int, float]]:
    flat = [(layer, h, v) for layer, row in enumerate(matrix) for h, v in enumerate(row)]
    return sorted(flat, key=lambda x: -x[2])[:k]


def verification(recipe: Recipe, truth: GroundTruth) -> str:
    """How the mechanism was checked, in words, with the measured numbers."""
    s = {k: v.tolist() for k, v in truth.head_scores.items()}
    fmt = ", ".join
    sep = "; "
    parts = [
        f"top-1 accuracy {truth.accuracy:.3f} on {truth.n_eval} fresh prompts "
        f"(seed {truth.eval_seed})",
        "previous-token scores (TransformerLens head_detector pattern): "
        + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["previous_token"])),
        "induction scores: " + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["induction"])),
        "copy scores on the task: " + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["copy"])),
        f"exhaustive per-head activation patching (mechscope intervene, checked against "
        f"TransformerLens patching in the tests; both directions; corruption: {truth.corruption}); "
        f"largest effects max(|denoise|, |noise|): "
        + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(truth.effect().tolist(), 5))
        + f"; circuit heads {[list(h) for h in truth.circuit_heads]}",
        "per-position tables (heads, resid_pre"
        + (", mlp_out" if truth.mlp_denoise is not None else "")
        + ") on batches " + fmt(f"{t.batch.index} ({t.batch.shape[0]}x{t.batch.shape[1]})"
                                for t in truth.by_position) + " of the patch generator",
    ]
    by = truth.accuracy_by_batch
    if len(by) > 1:
        what = {"retrieval": "depth 0, 0.1, .., 1", "facts": "subject length"}.get(
            recipe.task, "batch"
        )
        parts.insert(1, f"accuracy by {what}: {list(by)}")
    if truth.mlp_denoise is not None and truth.mlp_noise is not None:
        parts.append(f"MLP patching denoise {np.round(truth.mlp_denoise, 4).tolist()}, noise "
                     f"{np.round(truth.mlp_noise, 4).tolist()}; circuit MLP layers "
                     f"{list(truth.circuit_mlps)}")  # fmt: skip
    if "key_tag" in s:
        parts.append("key-tag scores (needle value -> its key): "
                     + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["key_tag"])))  # fmt: skip
    if truth.head_norms is not None:
        norms = truth.head_norms.tolist()
        alive = [[a, b] for a, row in enumerate(norms) for b, v in enumerate(row) if v > 1e-3]
        if len(alive) < sum(len(row) for row in norms):
            parts.append(f"heads with non-zero parameters {alive} (the others were pruned to "
                         "exactly zero by the group lasso of the recipe)")  # fmt: skip
    r = truth.retrieval
    if r is not None:
        drop = fmt(f"L{a}H{b}={r.baseline - r.uniform_alone[a, b]:.3f}"
                   for a, b, _ in _top((r.baseline - r.uniform_alone).tolist(), 3))
        parts.append(f"local (key-tagging) heads {[list(h) for h in r.local_heads]}; retrieval "
                     f"heads by ablation {[list(h) for h in r.heads]} (accuracy {r.baseline}; "
                     f"attention made uniform at the answer position, one head at a time, costs "
                     f"{drop}; all heads but one: "
                     + fmt(f"L{a}H{b}={v:.3f}" for a, b, v in _top(r.uniform_all_but.tolist(), 3))
                     + f" vs {r.uniform_all} with all ablated); uniform attention on the retrieval "
                     f"heads everywhere -> accuracy {r.heads_uniform}; on as many random other "
                     f"heads -> {list(r.random_other_heads_uniform)}")  # fmt: skip
    detectors = {k: truth.score_heads(v) for k, v in truth.head_scores.items()}
    parts.append("detector scores against the truth (ROC-AUC vs circuit / concordance with "
                 "|effect|): " + fmt(f"{k} {d['auc_circuit']:.2f}/{d['concordance_effect']:.2f}"
                                      for k, d in detectors.items()))  # fmt: skip
    return sep.join(parts) + "."


def write_card(
    directory: Path, recipe: Recipe, truth: GroundTruth | dict[str, Any], *, seconds: float,
    final_loss: float,
) -> dict[str, Any]:  # fmt: skip
    """Write ``card.json`` and ``card.md`` into ``directory``; returns the card dict.

    ``truth`` is a :class:`GroundTruth` or its ``ground_truth.json`` dict.
    """
    from safetensors import safe_open

    if not isinstance(truth, GroundTruth):
        truth = GroundTruth.from_dict(truth)
    weights = directory / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        n_params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    card = {
        "name": recipe.name,
        "task": recipe.task,
        "description": recipe.description,
        "accuracy": truth.accuracy,
        "circuit_heads": [list(h) for h in truth.circuit_heads],
        "circuit_mlps": list(truth.circuit_mlps),
        "circuit_rule": truth.circuit_rule,
        "mechanism": recipe.mechanism,
        "verification": verification(recipe, truth),
        "recipe": recipe.to_dict(),
        "train_seconds": round(seconds, 1),
        "final_train_loss": round(final_loss, 4),
        "n_params": n_params,
        "size_bytes": weights.stat().st_size,
    }
    if truth.retrieval is not None:
        card["retrieval_heads"] = [list(h) for h in truth.retrieval.heads]
        card["retrieval_rule"] = truth.retrieval.rule
    (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (directory / "card.md").write_text(card_markdown(card))
    return card


def _prod(shape: Any) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown."""
    r = card["recipe"]
    shape = (f"{r['n_layers']} layers, d_model {r['d_model']}, {r['n_heads']} heads of {r['d_head']}, "
             + ("attention-only" if r["d_mlp"] is None else f"d_mlp {r['d_mlp']}")
             + f", n_ctx {r['n_ctx']}, d_vocab {r['d_vocab']}")  # fmt: skip
    lines = [
        f"# zoo:{card['name']}",
        "",
        card["description"],
        "",
        f"- task: `{card['task']}`; model: {shape}; {card['n_params']:,} parameters "
        f"({card['size_bytes'] / 1e6:.2f} MB float32)",
        f"- accuracy (fresh prompts): **{card['accuracy']:.3f}**",
        f"- circuit heads: {card['circuit_heads']}; MLP layers: {card.get('circuit_mlps', [])}",
        f"- training: {r['steps']} steps of AdamW (lr {r['lr']}, batch {r['batch_size']}, weight "
        f"decay {r['weight_decay']}, seed {r['seed']}), {card['train_seconds']:.0f} s on CPU, "
        f"final loss {card['final_train_loss']}",
        "",
        "## Mechanism",
        "",
        card["mechanism"],
        "",
        "## Verification",
        "",
        card["verification"],
        "",
        "## Circuit rule",
        "",
        card["circuit_rule"],
        "",
        *([f"Retrieval heads {card['retrieval_heads']}: {card['retrieval_rule']}", ""]
          if "retrieval_rule" in card else []),
        "## Recipe",
        "",
        "```json",
        json.dumps(r, indent=2),
        "```",
        "",
        f"Reproduce with `mechscope zoo train {card['name']}`.",
        "",
    ]
    return "\n".join(lines)
