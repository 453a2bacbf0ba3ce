"""SAE circuit discovery vs exhaustive head patching: wall time to a ranked head list.

Cases (one JSON line each; protocol: ../shared/PERFORMANCE.md): ``zoo:induction``, ``zoo:ioi``,
``zoo:retrieval`` and ``smollm2:ioi``, each on the batch ``circuits.sae.task_batch(model, task,
n, seed)``. Ours: ``sae_circuit(model, batch)`` with the default :class:`SAEConfig` (500 epochs),
end to end (trace + SAE training + scoring) to its ranked heads. Peers, on the same batch, clean
cache and metric (the task's logit difference at the answer position, normalised 0 = corrupt
run, 1 = clean run):

- ``by_pos`` (exhaustive head patching, every head at every position): TransformerLens
  ``patching.get_act_patch_attn_head_out_by_pos``, one forward per (layer, pos, head).
- ``all_pos`` (one patch per head, every position at once): TL
  ``get_act_patch_attn_head_out_all_pos``.
  Either runs whole where a repetition is estimated (from an 8-patch probe) under
  ``--max-peer-s``; else (SmolLM2: 30 x 9 x T forwards; ``zoo:retrieval``: T = 256) a seeded
  random sample of its patches runs through ``generic_activation_patch(..., index_df=sample)``
  with the same setter, and the time is extrapolated per patch x total patches (TL runs one
  full forward per patch, so its time is linear in patches); the row says so
  (``peer_extrapolated_from`` = patches run, ``peer_patches`` = total).
- ``sweep`` (context): mechscope's own exact sweep ``attribution.patch_sweep(site="heads",
  by="all")``.

Gates before timing (exit 1 on failure): TL ``all_pos`` vs ``patch_sweep(by="all")`` within
``1e-4 * max|peer| + 1e-5`` (PERFORMANCE.md; both normalised the same way), over the whole grid
or the sampled entries; on the zoo also TL ``by_pos`` vs ``patch_sweep(by="position")``; and
the SAE is deterministic (two runs with the same seed: identical codes and node scores). Then
warm-up (the gate runs), ``--reps`` alternating repetitions, medians/min/max, ``peer / ours``
per peer. The row also carries the SAE's node ROC-AUC against the zoo ground truth
(``auc_circuit``, next to that of |exact head patching|), the SAE ranking's agreement with
exact head patching, and the work: patched forwards x FLOPs of one forward (peer) vs the
traced forwards + the SAE's training FLOPs (``epochs x 10 x rows x d_model x features``: 2 each
for the encode and decode matmuls, 6 for their weight and (decode only) input gradients),
achieved GFLOP/s beside a 2048^3 fp32 matmul measured in this run.

    python benchmarks/circuits.py                  # the four cases, --reps 5 (SmolLM2: --smollm2-reps 2), ~15 min
    python benchmarks/circuits.py --quick          # tiny native model + zoo:ioi, gates, 1 repetition (< 60 s)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from typing import Any

import torch
from transformer_lens import patching

from _common import _time, forward_flops, matmul_gflops
from mechscope.attribution import patch_sweep
from mechscope.circuits.evaluate import sae_agreement
from mechscope.models import load
from mechscope.tasks.base import TaskBatch

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=1"
CASES = ("zoo:induction", "zoo:ioi", "zoo:retrieval", "smollm2:ioi")
SETTERS = {"by_pos": (patching.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
           "all_pos": (patching.layer_head_vector_patch_setter, ("layer", "head"))}  # fmt: skip
PEER_NAMES = {"by_pos": "transformer_lens.patching.get_act_patch_attn_head_out_by_pos",
              "all_pos": "transformer_lens.patching.get_act_patch_attn_head_out_all_pos",
              "sweep": "mechscope.attribution.patch_sweep(site='heads', by='all')"}  # fmt: skip


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o)),
          flush=True)  # fmt: skip


def gate(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    err = float((got.double() - want.double()).abs().max())
    tol = 1e-4 * float(want.double().abs().max()) + 1e-5
    return {"pass": err <= tol, "max_abs_err": err, "tol": tol}


def stats(ts: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts)}


# -- the peers ----------------------------------------------------------------------------------


class Base:
    """What every TL sweep on a batch shares: the clean cache and the clean/corrupt metric."""

    def __init__(self, model, batch: TaskBatch) -> None:
        with torch.no_grad():
            self.c, self.k = (
                float(batch.metric(model(batch.clean))),
                float(batch.metric(model(batch.corrupt))),
            )
            _, self.cache = model.run_with_cache(batch.clean)
        self.model, self.batch = model, batch

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        return (self.batch.metric(logits) - self.k) / (self.c - self.k)


class Peer:
    """One TransformerLens head-patching sweep on a batch: the whole grid, or a seeded random
    sample of its patches (``generic_activation_patch(..., index_df=...)``, the same setter)."""

    def __init__(self, base: Base, kind: str, sample: int | None = None, seed: int = 0) -> None:
        import pandas as pd

        self.base, self.kind = base, kind
        model, T = base.model, base.batch.seq_len
        L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.axes = SETTERS[kind][1]
        sizes = {"layer": L, "pos": T, "head": H}
        grid = list(itertools.product(*(range(sizes[a]) for a in self.axes)))
        self.total = len(grid)
        self.index = None
        if sample is not None and sample < self.total:
            g = torch.Generator().manual_seed(seed)
            pick = sorted(torch.randperm(self.total, generator=g)[:sample].tolist())
            self.index = pd.DataFrame([grid[i] for i in pick], columns=list(self.axes))
        self.run_patches = self.total if self.index is None else len(self.index)

    @classmethod
    def sized(cls, base: Base, kind: str, max_s: float, cap: int, probe: int = 8) -> Peer:
        """The whole grid when one repetition is estimated under ``max_s`` seconds (from a probe
        of ``probe`` patches), else a sample of ``min(cap, max_s / 2 / per-patch)`` (>= 16)."""
        full = cls(base, kind)
        if full.total <= probe:
            return full
        p = cls(base, kind, sample=probe, seed=1)
        per = _time(p) / probe
        if per * full.total <= max_s:
            return full
        return cls(base, kind, sample=max(16, min(cap, int(max_s / 2 / per))))

    def __call__(self) -> torch.Tensor:
        setter, names = SETTERS[self.kind]
        b = self.base
        return patching.generic_activation_patch(
            b.model, b.batch.corrupt, b.cache, b.metric, setter, "z",
            index_axis_names=names if self.index is None else None, index_df=self.index,
        )  # fmt: skip

    def time(self) -> float:
        """Seconds for the whole grid (measured, or extrapolated per patch from the sample)."""
        return _time(self) * self.total / self.run_patches

    def label(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peer": PEER_NAMES[self.kind], "peer_patches": self.total}
        if self.index is not None:
            out["peer_extrapolated_from"] = self.run_patches
        return out

    def subset(self, full: torch.Tensor) -> torch.Tensor:
        """The entries of a full ``[layer, (pos,) head]`` grid that this peer's sample covers."""
        if self.index is None:
            return full
        cols = [torch.as_tensor(self.index[a].to_numpy().copy()) for a in self.axes]
        return full[tuple(cols)]


# -- ours ---------------------------------------------------------------------------------------


def sae_work(model, result, batch: TaskBatch, config, solved_check: bool) -> dict[str, Any]:
    """FLOPs of one ``sae_circuit`` call: the traced forward of every kept prompt (positives
    and negatives) + ``epochs`` full-batch Adam steps on ``rows x d_model``."""
    d, F = int(model.cfg.d_model), int(config.n_features)
    n_heads = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    kept = int(result.codes_pos.shape[0]) + int(result.codes_neg.shape[0])
    rows = (getattr(result, "fit", None) or {}).get("rows") or min(
        int(config.n_train), kept
    ) * n_heads
    train = float(config.epochs) * 10.0 * rows * d * F
    trace = forward_flops(model, kept, batch.seq_len)  # the traced forward (positives + negatives)
    if solved_check:  # a TaskBatch: clean and corrupt rows run once to find the solved pairs
        trace += forward_flops(model, 2 * batch.batch_size, batch.seq_len)
    return {"sae_rows": int(rows), "sae_epochs": int(config.epochs), "sae_features": F,
            "sae_train_flops": train, "trace_flops": trace, "prompts_kept": kept}  # fmt: skip


def case(model, name: str, batch: TaskBatch, pair: tuple[torch.Tensor, torch.Tensor] | None,
         reps: int, ceiling: float, *, max_peer_s: float, cap: int, gate_by_pos: bool,
         truth: Any = None) -> dict[str, Any]:  # fmt: skip
    """Gates, then ``reps`` alternating repetitions; emits one JSON line (exit 1 on a failed gate).

    A TL peer whose repetition is estimated over ``max_peer_s`` is sampled (:meth:`Peer.sized`)
    and gated on the sampled entries; ``gate_by_pos``: run our by-position sweep to gate TL's
    by-position grid (cheap on the zoo). Our ``patch_sweep`` is timed in the repetitions only
    when its gate run took under ``max_peer_s`` (else that one run is its time, ``R`` = 1).
    """
    from mechscope.circuits.sae import SAEConfig, sae_circuit

    config = SAEConfig()
    target = batch if pair is None else pair
    L, H, T, b = int(model.cfg.n_layers), int(model.cfg.n_heads), batch.seq_len, batch.batch_size

    def ours():
        return sae_circuit(model, target, config=config, progress=False)

    def sweep():
        return patch_sweep(model, batch, site="heads", by="all", progress=False)

    # -- gates (their runs are the warm-up) ------------------------------------------------------
    r1, r2 = ours(), ours()
    det = all(
        torch.equal(getattr(r1, f), getattr(r2, f))
        for f in ("codes_pos", "codes_neg", "node_scores")
    )
    res: list[Any] = []
    t_sweep = _time(lambda: res.append(sweep()))
    exact = res[0]
    base = Base(model, batch)
    all_pos = Peer.sized(base, "all_pos", max_peer_s, cap)
    by_pos = Peer.sized(base, "by_pos", max_peer_s, cap)
    gates: dict[str, Any] = {"gate_deterministic": det,
                             "gate_all_pos": gate(all_pos.subset(exact.scores), all_pos())}  # fmt: skip
    gates["gate_all_pos"]["entries"] = all_pos.run_patches
    ok = det and gates["gate_all_pos"]["pass"]
    if gate_by_pos:
        mine = patch_sweep(model, batch, site="heads", by="position", progress=False).scores
        gates["gate_by_pos"] = gate(by_pos.subset(mine), by_pos()) | {"entries": by_pos.run_patches}
        ok = ok and gates["gate_by_pos"]["pass"]
    else:
        gates["gate_by_pos"] = (
            "not run (SmolLM2: our by-position sweep is minutes; all_pos is gated)"
        )
    row: dict[str, Any] = {
        "case": name, "gate": "pass" if ok else "FAIL", **gates,
        "batch": b, "seq_len": T, "layers": L, "heads": H, "d_model": int(model.cfg.d_model),
        "sae_config": {"n_features": config.n_features, "l1": config.l1, "epochs": config.epochs,
                       "n_train": config.n_train, "seed": config.seed},
        "pairs": dict(r1.pairs),
        "top_heads": [[int(ly), int(h), float(s)] for ly, h, s in r1.ranked_heads()[:5]],
        "vs_exact_all_pos": sae_agreement(r1.node_scores, exact.scores),
        "work": sae_work(model, r1, batch, config, pair is None),
    }  # fmt: skip
    if truth is not None:
        row["auc_circuit"] = float(truth.score_heads(r1.node_scores.numpy())["auc_circuit"])
        row["auc_circuit_exact_all_pos"] = float(
            truth.score_heads(exact.scores.abs().numpy())["auc_circuit"]
        )
        row["circuit_heads"] = [list(h) for h in truth.circuit_heads]
    if not ok:
        emit(row)
        sys.exit(1)
    # -- timing: per repetition TL by_pos, ours, TL all_pos, (our patch_sweep) -------------------
    time_sweep = t_sweep <= max_peer_s
    to: list[float] = []
    tp: dict[str, list[float]] = {
        "by_pos": [],
        "all_pos": [],
        "sweep": [] if time_sweep else [t_sweep],
    }
    runtime: dict[str, list[float]] = {}
    for _ in range(reps):
        tp["by_pos"].append(by_pos.time())
        out: list[Any] = []
        to.append(_time(lambda out=out: out.append(ours()) or out[-1].ranked_heads()))
        for key, v in out[-1].runtime.items():
            runtime.setdefault(key, []).append(float(v))
        tp["all_pos"].append(all_pos.time())
        if time_sweep:
            tp["sweep"].append(_time(sweep))
    f1 = forward_flops(model, b, T)
    ours_flops = row["work"]["sae_train_flops"] + row["work"]["trace_flops"]
    ours_med = statistics.median(to)
    row |= {"R": reps, "ours": "mechscope.circuits.sae.sae_circuit (trace + SAE training + scoring)",
            "ours_s": stats(to), "ours_runtime_s": {k: statistics.median(v) for k, v in runtime.items()},
            "ours_flops": ours_flops, "ours_gflops": ours_flops / ours_med / 1e9,
            "matmul_2048_fp32_gflops": ceiling}  # fmt: skip
    for k, p in (("by_pos", by_pos), ("all_pos", all_pos)):
        med = statistics.median(tp[k])
        row[k] = {**p.label(), "peer_s": stats(tp[k]), "ratio_peer_over_ours": med / ours_med,
                  "peer_forwards": p.total + 1, "peer_flops": f1 * (p.total + 1),
                  "peer_flops_over_ours": f1 * (p.total + 1) / ours_flops,
                  "peer_gflops": f1 * (p.total + 1) / med / 1e9}  # fmt: skip
    med = statistics.median(tp["sweep"])
    row["sweep"] = {"peer": PEER_NAMES["sweep"], "R": len(tp["sweep"]), "peer_s": stats(tp["sweep"]),
                    "ratio_peer_over_ours": med / ours_med, "path": exact.work["path"],
                    "flops_vs_naive": exact.work["flops_vs_naive"],
                    "peer_flops_over_ours": f1 * (exact.n_patches + 1) * exact.work["flops_vs_naive"] / ours_flops}  # fmt: skip
    row["target_50x_vs_exhaustive"] = row["by_pos"]["ratio_peer_over_ours"] >= 50
    if truth is not None:  # the runtime target is for the zoo tasks
        row["target_under_10s"] = ours_med < 10
    emit(row)
    return row


# -- main ----------------------------------------------------------------------------------------


def tiny_case() -> None:
    """A random tiny model and a toy batch (it solves no task: the SAE gets the (pos, neg) pair)."""
    model = load(TINY)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (6, 10), generator=g)
    corrupt = clean.clone()
    corrupt[:, 4] = (clean[:, 4] + 1) % 50
    batch = TaskBatch(task="toy", clean=clean, corrupt=corrupt, answer=torch.arange(1, 7),
                      corrupt_answer=torch.arange(7, 13), answer_pos=torch.full((6,), 9), seed=0)  # fmt: skip
    case(
        model,
        "tiny:toy",
        batch,
        (clean, corrupt),
        1,
        0.0,
        max_peer_s=60.0,
        cap=100,
        gate_by_pos=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny model + zoo:ioi, gates, one repetition"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smollm2-reps", type=int, default=2)
    ap.add_argument("--n", type=int, default=None, help="prompts per batch (default: task_batch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument(
        "--max-peer-s",
        type=float,
        default=30.0,
        help="sample a TL sweep whose repetition is estimated longer than this",
    )
    ap.add_argument(
        "--sample", type=int, default=100, help="most TL patches a sampled repetition runs"
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from mechscope.circuits import sae
    from mechscope.models.zoo.groundtruth import GroundTruth

    if args.quick:
        tiny_case()
        model = load("zoo:ioi")
        batch = sae.task_batch(model, "ioi", args.n, args.seed)
        case(model, "zoo:ioi", batch, None, 1, 0.0, max_peer_s=60.0, cap=100, gate_by_pos=True,
             truth=GroundTruth.load("zoo:ioi"))  # fmt: skip
        return
    ceiling = matmul_gflops()
    for name in args.cases:
        spec, task = ("smollm2", "ioi") if name == "smollm2:ioi" else (name, name.split(":")[1])
        model = load(spec)
        batch = sae.task_batch(model, task, args.n, args.seed)
        zoo = spec.startswith("zoo:")
        case(model, name, batch, None, args.reps if zoo else args.smollm2_reps, ceiling,
             max_peer_s=args.max_peer_s, cap=args.sample, gate_by_pos=zoo,
             truth=GroundTruth.load(spec) if zoo else None)  # fmt: skip


if __name__ == "__main__":
    main()
