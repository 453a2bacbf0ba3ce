"""Head divergence (VHD) and reinforcement (VHR) on SmolLM2 answering from contradicting contexts.

For known facts (ROME's ``known_1000.json`` restricted to the facts SmolLM2-135M predicts,
:func:`mechscope.data.known_facts`) build a counterfactual context by swapping the target with the
target of another fact of the same relation: ``"Context: <prompt> <other target>.\\nQuestion:
<prompt>"``. The task metric (:func:`mechscope.circuits.divergence.context_task`) counts the
model as following the context when its top-1 next token is the counterfactual's first token;
the logit difference is counterfactual minus known target.

Steps: mask-mode VHD (the context sentence as the segment, query = last token) on the dev half;
VHR heads (:func:`select_reinforced`: outliers zeroed, above-median per layer, the last
round(14/32 * 30) = 13 layers); then the metric on dev and held-out halves unreinforced, with the
VHR heads scaled by ``--alpha`` and with as many random heads per layer (``--n-random`` draws),
the heads scaled at the answer position only (``query``) and at every position (``all``). With
``--modes`` also the delete and filler VHD, correlated with mask. Everything goes into one run of
the store (plus the HeadDivergence and ReinforcementResult as runs of their own).

Run ``python experiments/head_divergence.py --help``; ``--quick`` for a small smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechscope.circuits.divergence import (
    context_prompt,
    context_task,
    evaluate_reinforcement,
    head_divergence,
    select_reinforced,
)
from mechscope.models import load
from mechscope.store import Store


def counterfactual_rows(model: Any, n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``n`` rows (context, question, counterfactual target, known target): the known target
    swapped for another same-relation fact's target whose first token differs."""
    from mechscope.data import known_facts

    tok = model.tokenizer
    facts = known_facts("smollm2")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(facts))

    def first(text: str) -> int:
        return int(tok(" " + text, add_special_tokens=False)["input_ids"][0])

    rows = []
    for i in order:
        f = facts[int(i)]
        others = [g for g in facts if g["relation_id"] == f["relation_id"]
                  and first(g["attribute"]) != first(f["attribute"])]  # fmt: skip
        if not others:
            continue
        g = others[int(rng.integers(len(others)))]
        rows.append(
            (f"{f['prompt']} {g['attribute']}.", f["prompt"], g["attribute"], f["attribute"])
        )
        if len(rows) == n:
            break
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--n", type=int, default=40, help="prompts in all (half dev, half held-out)")
    ap.add_argument("--alpha", type=float, default=2.0, help="VHR scale (paper: 2)")
    ap.add_argument("--n-random", type=int, default=5, help="random-head draws")
    ap.add_argument("--modes", default="mask,delete,filler", help="VHD removal modes (mask first)")
    ap.add_argument("--store", type=Path, default=Path("mechscope-store"), help="store directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="12 prompts, 2 random draws, mask only")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.n_random, args.modes = 12, 2, "mask"
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load("smollm2")
    rows = counterfactual_rows(model, args.n, args.seed)
    half = len(rows) // 2
    dev, held = rows[:half], rows[half:]
    modes = args.modes.split(",")
    vhds = {}
    for mode in modes:
        vhds[mode] = head_divergence(model, [context_prompt(c, q) for c, q, _, _ in dev],
                                     [c for c, _, _, _ in dev], mode=mode)  # fmt: skip
    vhd = vhds["mask"]
    heads = select_reinforced(vhd)
    evals = {}
    for split, part in (("dev", dev), ("held_out", held)):
        task = context_task(model, part, seed=args.seed)
        for where in ("query", "all"):
            evals[f"{split}_{where}"] = evaluate_reinforcement(
                model, task, heads, alpha=args.alpha, n_random=args.n_random, seed=args.seed,
                positions=where)  # fmt: skip
    numbers: dict[str, Any] = {"n_dev": len(dev), "n_held_out": len(held), "n_heads": len(heads),
                               "top_heads": [list(h) for h in vhd.top(9)]}  # fmt: skip
    for key, res in evals.items():
        rnd = slice(2, None)
        numbers[key] = {
            "base": {"follow": res.accuracy[0], "logit_diff": res.logit_diff[0], "p_cf": res.answer_prob[0]},
            "vhr": {"follow": res.accuracy[1], "logit_diff": res.logit_diff[1], "p_cf": res.answer_prob[1]},
            "random_mean": {"follow": float(np.mean(res.accuracy[rnd])),
                            "logit_diff": float(np.mean(res.logit_diff[rnd])),
                            "p_cf": float(np.mean(res.answer_prob[rnd]))},
        }  # fmt: skip
    for mode in modes[1:]:
        a, b = vhds["mask"].scores.flatten(), vhds[mode].scores.flatten()
        numbers[f"pearson_mask_{mode}"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    store = Store(args.store)
    result_runs = {
        "vhd_mask": vhd.save(store),
        "held_out_query": evals["held_out_query"].save(store),
    }
    config = {**vars(args), "store": str(args.store)}
    with store.run("head_divergence_experiment", config=config, model=model, seed=args.seed) as run:
        run.add_table("prompts", [{"split": "dev" if i < half else "held_out", "context": c,
                                   "question": q, "counterfactual": a, "known": k}
                                  for i, (c, q, a, k) in enumerate(rows)])  # fmt: skip
        for mode, r in vhds.items():
            run.add_table(f"vhd_{mode}", r.to_frame())
        for key, res in evals.items():
            run.add_table(f"reinforcement_{key}", res.to_frame())
        run.add_json("figure_vhd", json.loads(vhd.figure().to_json()))
        run.add_json("figure_tokens", json.loads(vhd.figure(view="tokens").to_json()))
        run.add_json(
            "figure_heads", json.loads(evals["held_out_query"].figure(view="heads").to_json())
        )
        run.add_json("figure_held_out", json.loads(evals["held_out_query"].figure().to_json()))
        run.add_json("summary", {"numbers": numbers, "heads": [list(h) for h in heads],
                                 "result_runs": result_runs})  # fmt: skip
        run.time("total", time.perf_counter() - t0)
    lines = [f"SmolLM2, {len(dev)} dev / {len(held)} held-out counterfactual contexts; "
             f"{len(heads)} VHR heads (layers 17-29), alpha {args.alpha:g}; "
             f"{time.perf_counter() - t0:.0f} s; run {run.id} in {args.store}",
             f"top mask-VHD heads (dev): {numbers['top_heads']}"]  # fmt: skip
    for key in evals:
        n = numbers[key]
        lines.append(f"{key:>15}: follows context  base {n['base']['follow']:.2f}  "
                     f"vhr {n['vhr']['follow']:.2f}  random {n['random_mean']['follow']:.2f} | "
                     f"logit diff {n['base']['logit_diff']:+.2f} / {n['vhr']['logit_diff']:+.2f} / "
                     f"{n['random_mean']['logit_diff']:+.2f} | p(cf) {n['base']['p_cf']:.3f} / "
                     f"{n['vhr']['p_cf']:.3f} / {n['random_mean']['p_cf']:.3f}")  # fmt: skip
    for mode in modes[1:]:
        lines.append(
            f"Pearson(mask VHD, {mode} VHD) over heads: {numbers[f'pearson_mask_{mode}']:.3f}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
