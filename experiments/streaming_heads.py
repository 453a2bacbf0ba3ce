"""Streaming vs retrieval heads on SmolLM2-135M (or a zoo model), as DuoAttention finds them.

Trains DuoAttention gates (:func:`mechscope.circuits.streaming.streaming_gates`: one gate per
key/value head mixing full and sink + recent attention, MSE of the final hidden states at the
answer token + L1) on needle-in-a-haystack prompts (``tasks.text_retrieval``: stdlib docstrings,
a passcode needle, depths spread over [0.1, 0.9]), then compares the gate ranking with

- the retrieval score of Wu et al. (``mechscope.circuits.retrieval.retrieval_scores``, greedy
  decoding, copy-paste events) on the same prompts, when that module is importable;
- a cheap copy score that needs one forward: the attention each head pays, from the answer
  position, to the needle's value tokens (mean over prompts);
- for a zoo model, its ground-truth retrieval heads (``GroundTruth.retrieval.heads``).

Everything goes into one store run (kind ``streaming_heads_experiment``): the gates result (table
``frame``, tensors), the agreement numbers (``summary``) and the figures (gates heatmap, loss
curve, copy-score heatmap). ``--quick`` is a smoke test (3 steps, 2 short prompts).

Run ``python experiments/streaming_heads.py --help``; see experiments/README.md for timings.
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

from mechscope.circuits.streaming import StreamingHeads, streaming_gates
from mechscope.models import load
from mechscope.probes import trace
from mechscope.store import Store
from mechscope.tasks import text_retrieval
from mechscope.tasks.base import TaskBatch


def prompts(model: Any, n: int, context_len: int, seed: int) -> list[TaskBatch]:
    """``n`` one-row needle batches at depths spread over [0.1, 0.9]."""
    depths = np.linspace(0.1, 0.9, n) if n > 1 else [0.5]
    return [text_retrieval(model, 1, context_len=context_len, depth=float(d), seed=seed + i)
            for i, d in enumerate(depths)]  # fmt: skip


@torch.no_grad()
def copy_score(model: Any, batches: list[TaskBatch]) -> torch.Tensor:
    """``[layer, head]``: attention from the answer position to the needle's value tokens (the
    tokens from ``value_start`` to the needle's end), mean over rows."""
    n_layers = int(model.cfg.n_layers)
    total = torch.zeros(n_layers, int(model.cfg.n_heads))
    rows = 0
    for b in batches:
        t = trace(model, b.clean, sites=("patterns",), positions=(-1,), progress=False)
        for i in range(b.batch_size):
            lo, hi = int(b.meta["value_start"][i]), int(b.meta["needle_end"][i])
            for layer in range(n_layers):
                p = t.get("patterns", layer)[i, :, -1]  # [head, key]
                total[layer] += p[:, lo:hi].sum(-1).float().cpu()
            rows += 1
    return total / rows


def _k(scores: Any) -> int:
    """Top-k size for the overlap: the number of heads scoring above 0.1 (at least 9, one layer)."""
    return max(9, int((torch.as_tensor(scores) > 0.1).sum()))


def zoo_batches(spec: str, n: int, seed: int) -> list[TaskBatch]:
    from mechscope.models.zoo import RECIPES
    from mechscope.models.zoo.data import EVAL_BATCHES

    recipe = RECIPES[spec.removeprefix("zoo:")]
    return list(EVAL_BATCHES[recipe.task](recipe, n, seed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default="smollm2", help="smollm2 or zoo:retrieval")
    ap.add_argument("--n", type=int, default=4, help="prompts (zoo: rows over 11 depths)")
    ap.add_argument("--context-len", type=int, default=256, help="tokens per prompt")
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps (DuoAttention: 2,000)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--l1", type=float, default=0.05)
    ap.add_argument("--keep-full", type=float, default=None, help="default: 0.5 GQA, 0.25 MHA")
    ap.add_argument(
        "--retrieval",
        choices=["auto", "off"],
        default="auto",
        help="also compute Wu et al.'s retrieval score (circuits.retrieval)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 2 prompts of 96 tokens, 3 steps"
    )
    ap.add_argument("--store", type=Path, default=Path("mechscope-store"), help="store directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.context_len, args.steps, args.recent = 2, 96, 3, 32

    model = load(args.model)
    zoo = args.model.startswith("zoo:")
    batches = zoo_batches(args.model, args.n, args.seed) if zoo else \
        prompts(model, args.n, args.context_len, args.seed)  # fmt: skip
    t0 = time.time()
    res: StreamingHeads = streaming_gates(model, batches, sink=args.sink, recent=args.recent,
                                          steps=args.steps, lr=args.lr, l1=args.l1,
                                          keep_full=args.keep_full, seed=args.seed)  # fmt: skip
    t_train = time.time() - t0
    numbers: dict[str, Any] = {
        "model": args.model, "steps": args.steps, "seconds_training": round(t_train, 1),
        "n_prompts": sum(b.batch_size for b in batches), "seq_lens": sorted({b.seq_len for b in batches}),
        "sink": res.sink, "recent": res.recent, "keep_full": res.keep_full,
        "loss_first": float(res.loss_curve[0]), "loss_last": float(res.loss_curve[-1]),
        "mse_last_step": float(res.mse_curve[-1]), "final_mse": res.final_mse,
        "gate_min": float(res.gates.min()), "gate_mean": float(res.gates.mean()),
        "gate_max": float(res.gates.max()),
        "n_gates_at_1": int((res.gates >= 0.999).sum()), "n_kv_heads": int(res.gates.numel()),
        "full_kv_heads": [list(h) for h in res.full_kv_heads],
        "top_kv_heads": [[int(i) // res.gates.shape[1], int(i) % res.gates.shape[1],
                          round(float(res.gates.reshape(-1)[i]), 4)]
                         for i in torch.argsort(res.gates.reshape(-1), descending=True)[:10]],
    }  # fmt: skip
    comparisons: dict[str, Any] = {}
    extra: dict[str, torch.Tensor] = {}
    if zoo:
        from mechscope.models.zoo.groundtruth import GroundTruth

        truth = GroundTruth.load(args.model)
        if truth.retrieval is not None:
            grid = torch.zeros_like(res.head_gates)
            for layer, head in truth.retrieval.heads:
                grid[layer, head] = 1.0
            comparisons["ground_truth"] = res.agreement(grid, threshold=0.5,
                                                        k=len(truth.retrieval.heads))  # fmt: skip
    else:
        copy = copy_score(model, batches)
        extra["copy_score"] = copy
        comparisons["copy_score"] = res.agreement(copy, k=_k(copy))
        if args.retrieval == "auto":
            try:
                from mechscope.circuits.retrieval import retrieval_scores
            except ImportError as exc:  # the module is being written in parallel
                comparisons["retrieval_score"] = {"skipped": f"circuits.retrieval: {exc}"}
            else:
                t1 = time.time()
                rs = retrieval_scores(model, batches)
                extra["retrieval_score"] = torch.as_tensor(rs.scores).float()
                comparisons["retrieval_score"] = {**res.agreement(rs, k=_k(rs.scores)),
                                                  "seconds": round(time.time() - t1, 1)}  # fmt: skip
    numbers["agreement"] = comparisons

    config = {**vars(args), "store": str(args.store)}
    store = Store(args.store)
    gates_run = res.save(store)
    with store.run("streaming_heads_experiment", config=config, model=model, seed=args.seed) as run:
        run.add_table("gates", res.to_frame())
        run.add_tensors("grids", {"gates": res.gates, "head_gates": res.head_gates, **extra})
        run.add_json("figure_gates", json.loads(res.figure().to_json()))
        run.add_json("figure_loss", json.loads(res.figure(view="loss").to_json()))
        if "copy_score" in extra:
            from mechscope.figures import layer_head_heatmap

            fig = layer_head_heatmap(extra["copy_score"], title="attention from the answer to "
                                     "the needle value", colorscale="Viridis")  # fmt: skip
            run.add_json("figure_copy_score", json.loads(fig.to_json()))
        run.add_json("summary", {**numbers, "gates_run": gates_run})
    if args.json:
        sys.stdout.write(json.dumps({"run_id": run.id, **numbers}) + "\n")
    else:
        for key, value in numbers.items():
            if key != "agreement":
                sys.stdout.write(f"{key}: {value}\n")
        for key, value in comparisons.items():
            sys.stdout.write(f"agreement with {key}: {value}\n")
        sys.stdout.write(f"run {run.id} (gates: {gates_run}) in {args.store}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
