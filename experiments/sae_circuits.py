"""Discrete-SAE circuit discovery against ground truth (METHODS.md section 5; issue 9's targets).

1. Zoo (``zoo:induction``, ``zoo:ioi``, ``zoo:retrieval``): the SAE's node ROC-AUC against each
   checkpoint's ground-truth circuit for ``--seeds`` SAE seeds (the paper reports the mean of 10
   trials), on the truth's own minimal pairs (``circuits.sae.task_batch``); then every method of
   :func:`mechscope.circuits.evaluate.evaluate_methods` (SAE, exact head patching, attribution
   patching, the task's head detector) on seed 0 with ROC-AUC, precision/recall at the circuit's
   size, rank correlation with the patching effect and runtime. For induction also the SAE on
   :func:`mechscope.tasks.induction`'s own corruption (a fresh second half), METHODS.md's test.
2. SmolLM2-135M on IOI (single-token names, ABC negatives): the SAE ranking against exact head
   patching of all 270 heads on the same ``--pairs`` pairs (Spearman, top-k overlap against
   chance), and the same numbers for attribution patching.

One store run (kind ``sae_circuits``): each evaluation's frame, payload and figures
(``figure_<model>_metrics``, ``figure_<model>_scores``), the SAE circuit graphs, the per-seed
AUCs and a ``summary`` with the printed numbers. ``--quick``: 3 seeds, 4 SmolLM2 pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from mechscope.circuits.evaluate import evaluate_methods
from mechscope.circuits.sae import SAEConfig, sae_circuit, task_batch
from mechscope.models import load
from mechscope.models.zoo.groundtruth import GroundTruth
from mechscope.store import Store
from mechscope.tasks import induction

ZOO = ("induction", "ioi", "retrieval")


def seed_sweep(model: Any, batch: Any, truth: GroundTruth, seeds: int) -> dict[str, Any]:
    aucs, conc, secs = [], [], []
    for seed in range(seeds):
        res = sae_circuit(model, batch, config=SAEConfig(seed=seed), progress=False)
        s = truth.score_heads(res.node_scores.numpy())
        aucs.append(round(s["auc_circuit"], 4))
        conc.append(round(s["concordance_effect"], 4))
        secs.append(round(res.runtime["total_s"], 2))
    return {"auc": aucs, "auc_mean": round(statistics.mean(aucs), 3),
            "auc_std": round(statistics.pstdev(aucs), 3), "auc_min": min(aucs),
            "share_at_least_0.95": sum(a >= 0.95 for a in aucs) / len(aucs),
            "concordance_mean": round(statistics.mean(conc), 3), "seconds": secs}  # fmt: skip


def table(ev: Any) -> dict[str, Any]:
    return {m.name: {k: (round(v, 3) if isinstance(v, float) else v)
                     for k, v in {**m.metrics, "runtime_s": m.runtime_s}.items()}
            for m in ev.methods}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", default="runs/sae_circuits")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--pairs", type=int, default=8, help="SmolLM2 IOI pairs")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-smollm2", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.pairs = 3, 4
    t0 = time.perf_counter()
    out: dict[str, Any] = {"zoo": {}}
    frames, payloads, figures = {}, {}, {}
    for name in ZOO:
        model, truth = load(f"zoo:{name}"), GroundTruth.load(f"zoo:{name}")
        batch = task_batch(model)
        row: dict[str, Any] = {"circuit": [list(h) for h in truth.circuit_heads],
                               "batch": list(batch.clean.shape),
                               "sae_seeds": seed_sweep(model, batch, truth, args.seeds)}  # fmt: skip
        if name == "induction":  # METHODS.md's test: negatives = a fresh second half
            fresh = induction(64, seq_len=20, d_vocab=int(model.cfg.d_vocab), seed=0)
            row["sae_seeds_fresh_negatives"] = seed_sweep(model, fresh, truth, args.seeds)
        ev = evaluate_methods(model, progress=False)
        row["methods"] = table(ev)
        row["skipped"] = dict(ev.skipped)
        out["zoo"][name] = row
        frames[f"zoo_{name}"] = ev.to_frame()
        payloads[f"zoo_{name}"] = ev.payload()
        figures[f"zoo_{name}_metrics"] = ev.figure()
        figures[f"zoo_{name}_scores"] = ev.figure("scores")
        figures[f"zoo_{name}_graph"] = sae_circuit(model, batch, progress=False).figure("graph")
        sys.stderr.write(f"zoo:{name}: {json.dumps(row)}\n")
    if not args.no_smollm2:
        model = load("smollm2")
        ev = evaluate_methods(model, task="ioi", n=args.pairs, progress=False)
        out["smollm2_ioi"] = {"reference": ev.reference, "methods": table(ev),
                              "agreement": {k: round(v, 3) for k, v in ev.agreement.items()},
                              "batch": ev.batch}  # fmt: skip
        frames["smollm2_ioi"] = ev.to_frame()
        payloads["smollm2_ioi"] = ev.payload()
        figures["smollm2_ioi_metrics"] = ev.figure()
        figures["smollm2_ioi_scores"] = ev.figure("scores")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    with Store(args.store).run("sae_circuits", config=vars(args), seed=0) as run:
        for key, frame in frames.items():
            run.add_table(key, frame.drop(columns=[c for c in frame.columns if c == "note"]))
        for key, body in payloads.items():
            run.add_json(f"payload_{key}", body)
        for key, fig in figures.items():
            run.add_json(f"figure_{key}", json.loads(fig.to_json()))
        run.add_tensors("seed_aucs", {n: torch.tensor(r["sae_seeds"]["auc"])
                                      for n, r in out["zoo"].items()})  # fmt: skip
        run.add_json("summary", out)
        run.time("total", time.perf_counter() - t0)
    sys.stdout.write(json.dumps(out, indent=1, default=str) + f"\nrun {run.id} in {args.store}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
