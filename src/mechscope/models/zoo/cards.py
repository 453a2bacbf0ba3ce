"""Model cards of zoo checkpoints: ``card.json`` (for code) and ``card.md`` (for people).

The card is written from the recipe and the measured ground truth, never by hand, so it cannot
drift from the checkpoint: task, description, accuracy, circuit heads and the rule that picked
them, the mechanism, how it was verified, the full recipe with its seed, training time and size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechscope.models.zoo.recipes import Recipe


def _top(matrix: list[list[float]], k: int = 3) -> list[tuple[int, int, float]]:
    flat = [(layer, h, v) for layer, row in enumerate(matrix) for h, v in enumerate(row)]
    return sorted(flat, key=lambda x: -x[2])[:k]


def verification(recipe: Recipe, truth: dict[str, Any]) -> str:
    """How the mechanism was checked, in words, with the measured numbers."""
    s = truth["head_scores"]
    fmt = ", ".join
    parts = [
        f"top-1 accuracy {truth['accuracy']:.3f} on {truth['n_eval']} fresh prompts "
        f"(seed {truth['eval_seed']})",
        "previous-token scores (TransformerLens head_detector pattern): "
        + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["previous_token"])),
        "induction scores: " + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["induction"])),
        "copy scores on the task: " + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["copy"])),
        f"exhaustive per-head activation patching (TransformerLens patching, both directions; "
        f"corruption: {truth['patching'].get('corruption', '?')}); "
        f"circuit heads {truth['circuit_heads']}",
    ]
    by = truth.get("accuracy_by_batch", [])
    if len(by) > 1:
        what = {"retrieval": "depth 0, 0.1, .., 1", "facts": "subject length"}.get(
            recipe.task, "batch"
        )
        parts.insert(1, f"accuracy by {what}: {by}")
    if truth.get("circuit_mlps") is not None and "mlp_out_denoise" in truth["patching"]:
        p = truth["patching"]
        parts.append(f"MLP patching denoise {p['mlp_out_denoise']}, noise {p['mlp_out_noise']}; "
                     f"circuit MLP layers {truth['circuit_mlps']}")  # fmt: skip
        parts.append("MLP denoising by position (per layer, positions 0..answer_pos): "
                     + str(p["mlp_out_by_pos_denoise"]))  # fmt: skip
    if "key_tag" in s:
        parts.append("key-tag scores (needle value -> its key): "
                     + fmt(f"L{a}H{b}={v:.2f}" for a, b, v in _top(s["key_tag"])))  # fmt: skip
    if "head_norms" in truth:
        norms = truth["head_norms"]
        alive = [[a, b] for a, row in enumerate(norms) for b, v in enumerate(row) if v > 1e-3]
        if len(alive) < sum(len(row) for row in norms):
            parts.append(f"heads with non-zero parameters {alive} (the others were pruned to "
                         "exactly zero by the group lasso of the recipe)")  # fmt: skip
    if "ablation" in truth:
        a = truth["ablation"]
        parts.append(f"local (key-tagging) heads {truth.get('local_heads')}; "
                     f"uniform attention on retrieval heads {truth['retrieval_heads']} -> accuracy "
                     f"{a['retrieval_heads_uniform']}; on as many random other heads -> "
                     f"{a['random_other_heads_uniform']}")  # fmt: skip
    return "; ".join(parts) + "."


def write_card(
    directory: Path, recipe: Recipe, truth: dict[str, Any], *, seconds: float, final_loss: float
) -> dict[str, Any]:
    """Write ``card.json`` and ``card.md`` into ``directory``; returns the card dict."""
    from safetensors import safe_open

    weights = directory / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        n_params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    card = {
        "name": recipe.name,
        "task": recipe.task,
        "description": recipe.description,
        "accuracy": truth["accuracy"],
        "circuit_heads": truth["circuit_heads"],
        "circuit_mlps": truth.get("circuit_mlps", []),
        "circuit_rule": truth["circuit_rule"],
        "mechanism": recipe.mechanism,
        "verification": verification(recipe, truth),
        "recipe": recipe.to_dict(),
        "train_seconds": round(seconds, 1),
        "final_train_loss": round(final_loss, 4),
        "n_params": n_params,
        "size_bytes": weights.stat().st_size,
    }
    if "retrieval_heads" in truth:
        card["retrieval_heads"] = truth["retrieval_heads"]
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
