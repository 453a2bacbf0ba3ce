"""Batched exact activation patching vs TransformerLens's one-forward-per-patch loop.

Cases: ``get_act_patch_resid_pre`` and ``get_act_patch_attn_head_out_by_pos`` (denoising, the
normalised logit difference) on ``zoo:ioi`` and on SmolLM2 with a ~15-token IOI prompt pair.
Per PERFORMANCE.md: fp32 correctness gate first (exit 1 on failure, before timing), warm-up,
alternating repetitions, medians/min/max and peer/ours; U (patches), shapes, FLOPs relative to
the naive L*T(*H) forwards, achieved GFLOP/s beside a 2048^3 fp32 matmul measured in this run.
One JSON line per case.

    python benchmarks/patching.py            # zoo:ioi and SmolLM2
    python benchmarks/patching.py --quick    # tiny native model, gate only (< 30 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from transformer_lens import patching

from _common import _time, forward_flops, matmul_gflops
from mechscope.attribution import patch_sweep
from mechscope.models import load
from mechscope.tasks.base import TaskBatch

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=1"
PEERS = {"resid_pre": patching.get_act_patch_resid_pre,
         "heads": patching.get_act_patch_attn_head_out_by_pos}  # fmt: skip
PEER_NAMES = {"resid_pre": "get_act_patch_resid_pre", "heads": "get_act_patch_attn_head_out_by_pos"}


def _ld(batch: TaskBatch, logits: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    at = logits[rows, batch.answer_pos]
    return (at[rows, batch.answer] - at[rows, batch.corrupt_answer]).mean()


def case(model, name: str, batch: TaskBatch, site: str, reps: int, quick: bool, ceiling: float) -> dict:
    with torch.no_grad():
        c, k = float(_ld(batch, model(batch.clean))), float(_ld(batch, model(batch.corrupt)))
        _, cache = model.run_with_cache(batch.clean)

    def peer():
        return PEERS[site](model, batch.corrupt, cache, lambda lg: (_ld(batch, lg) - k) / (c - k))

    def ours():
        return patch_sweep(model, batch, site=site, progress=False)

    def ours_bf16():
        return patch_sweep(model, batch, site=site, progress=False, dtype="bfloat16")

    want, got = peer(), ours()
    err = float((got.scores.double() - want.double()).abs().max())
    tol = 1e-4 * float(want.abs().max()) + 1e-5
    b, n_pos = batch.clean.shape
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    row = {"case": f"{name}:{site}", "peer": f"transformer_lens.patching.{PEER_NAMES[site]}",
           "gate": "pass" if err <= tol else "FAIL", "max_abs_err": err, "tol": tol,
           "U": got.n_patches, "skipped": got.n_skipped, "run": got.work["run"],
           "batch": b, "seq_len": n_pos, "layers": L, "heads": H, "d_model": int(model.cfg.d_model),
           "grid": list(got.scores.shape), "forwards_ours": got.work["forwards"],
           "forwards_peer": got.n_patches + 1, "path": got.work["path"],
           "flops_vs_naive": got.work["flops_vs_naive"],
           "method_flops_vs_floor": got.work["token_layers"] / floor_token_layers(got, L, n_pos, b)}  # fmt: skip
    if err > tol:
        print(json.dumps(row), flush=True)
        sys.exit(1)
    if not quick:
        peer(), ours()  # warm-up
        tp, to = [], []
        for _ in range(reps):
            tp.append(_time(peer))
            to.append(_time(ours))
        f1 = forward_flops(model, b, n_pos)
        ours_flops = f1 * got.work["flops_vs_naive"] * (got.n_patches + 1)
        row |= {"R": reps, "peer_s": {"median": statistics.median(tp), "min": min(tp), "max": max(tp)},
                "ours_s": {"median": statistics.median(to), "min": min(to), "max": max(to)},
                "ratio_peer_over_ours": statistics.median(tp) / statistics.median(to),
                "ours_gflops": ours_flops / statistics.median(to) / 1e9,
                "peer_gflops": f1 * (got.n_patches + 1) / statistics.median(tp) / 1e9,
                "matmul_2048_fp32_gflops": ceiling}  # fmt: skip
        # bf16 screening: the same sweep on a bf16 copy of the weights, vs fp32 ours
        scr = ours_bf16()
        tb, tf = [], []
        for _ in range(reps):
            tb.append(_time(ours_bf16))
            tf.append(_time(ours))
        row |= {"bf16_over_fp32_speedup": statistics.median(tf) / statistics.median(tb),
                "bf16_agreement": agreement(got.scores, scr.scores)}
    print(json.dumps(row), flush=True)
    return row


def heads_extrapolated(model, batch: TaskBatch, reps: int, ceiling: float, peer_layers: int = 2) -> dict:
    """SmolLM2's head x position sweep: the peer's full grid is L*T*H (~4,000) forwards (~8 min a
    repetition), so the peer runs the first ``peer_layers`` layers (every position and head) and
    its time is scaled by patches (each of its patches is one full forward: linear in patches).
    The gate compares those layers."""
    import itertools

    import pandas as pd

    with torch.no_grad():
        c, k = float(_ld(batch, model(batch.clean))), float(_ld(batch, model(batch.corrupt)))
        _, cache = model.run_with_cache(batch.clean)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_pos = batch.clean.shape[1]
    idx = pd.DataFrame(list(itertools.product(range(peer_layers), range(n_pos), range(H))),
                       columns=["layer", "pos", "head"])  # fmt: skip

    def peer():
        return patching.generic_activation_patch(
            model, batch.corrupt, cache, lambda lg: (_ld(batch, lg) - k) / (c - k),
            patching.layer_pos_head_vector_patch_setter, "z", index_df=idx,
        ).view(peer_layers, n_pos, H)  # fmt: skip

    def ours():
        return patch_sweep(model, batch, site="heads", progress=False)

    want, got = peer(), ours()
    err = float((got.scores[:peer_layers].double() - want.double()).abs().max())
    tol = 1e-4 * float(want.abs().max()) + 1e-5
    row = {"case": "smollm2:heads", "peer": "transformer_lens.patching (z, by position), timed on "
           f"{peer_layers} of {L} layers and scaled by patches", "gate": "pass" if err <= tol else "FAIL",
           "max_abs_err": err, "tol": tol, "U": got.n_patches, "skipped": got.n_skipped,
           "peer_patches_timed": len(idx), "path": got.work["path"],
           "flops_vs_naive": got.work["flops_vs_naive"],
           "method_flops_vs_floor": got.work["token_layers"] / floor_token_layers(got, L, n_pos, 1)}  # fmt: skip
    if err > tol:
        print(json.dumps(row), flush=True)
        sys.exit(1)
    tp, to = [], []
    for _ in range(reps):
        tp.append(_time(peer) * got.n_patches / len(idx))
        to.append(_time(ours))
    row |= {"R": reps, "peer_s_scaled": {"median": statistics.median(tp), "min": min(tp), "max": max(tp)},
            "ours_s": {"median": statistics.median(to), "min": min(to), "max": max(to)},
            "ratio_peer_over_ours": statistics.median(tp) / statistics.median(to),
            "matmul_2048_fp32_gflops": ceiling}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def floor_token_layers(result, n_layers: int, n_pos: int, batch: int) -> float:
    """PERFORMANCE.md's floor: every patch of the grid from its layer on, at positions >= its
    own (token-layers; + the two unpatched runs)."""
    total = 2 * batch * n_pos * n_layers
    grid = result.scores
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in grid.shape)).view(-1, grid.ndim).tolist():
        layer = idx[0]
        pos = idx[1] if "pos" in result.axes else 0
        total += batch * (n_layers - layer) * (n_pos - pos)
    return float(total)


def agreement(fp32: torch.Tensor, other: torch.Tensor, k: int = 10) -> dict:
    a, b = fp32.flatten().double(), other.flatten().double()
    ta = set(a.abs().topk(min(k, a.numel())).indices.tolist())
    tb = set(b.abs().topk(min(k, b.numel())).indices.tolist())
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    return {"top10_overlap": len(ta & tb) / len(ta), "spearman": rho, "max_abs_diff": float((a - b).abs().max())}


def smollm2_batch(model) -> TaskBatch:
    text_c = "When Mary and John went to the store, John gave a drink to"
    text_k = "When Mary and John went to the store, Anna gave a drink to"
    tok = model.tokenizer
    clean = torch.tensor([tok.encode(text_c)])
    corrupt = torch.tensor([tok.encode(text_k)])
    if clean.shape != corrupt.shape:
        raise SystemExit("the SmolLM2 prompt pair tokenizes to different lengths")
    ans, wrong = tok.encode(" Mary")[-1], tok.encode(" John")[-1]
    return TaskBatch(task="ioi", clean=clean, corrupt=corrupt, answer=torch.tensor([ans]),
                     corrupt_answer=torch.tensor([wrong]),
                     answer_pos=torch.tensor([clean.shape[1] - 1]), seed=0)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny native model, gate only")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smollm2-reps", type=int, default=3)
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.quick:
        model = load(TINY)
        g = torch.Generator().manual_seed(0)
        clean = torch.randint(0, 50, (4, 10), generator=g)
        corrupt = clean.clone()
        corrupt[:, 4] = (clean[:, 4] + 1) % 50
        batch = TaskBatch(task="toy", clean=clean, corrupt=corrupt, answer=torch.tensor([1, 2, 3, 4]),
                          corrupt_answer=torch.tensor([5, 6, 7, 8]),
                          answer_pos=torch.full((4,), 9), seed=0)  # fmt: skip
        for site in PEERS:
            case(model, "tiny", batch, site, 0, True, 0.0)
        return
    ceiling = matmul_gflops()
    from mechscope.models.zoo.groundtruth import GroundTruth

    model = load("zoo:ioi")
    batch = GroundTruth.load("zoo:ioi").by_position[0].batch.batch()
    for site in PEERS:
        case(model, "zoo:ioi", batch, site, args.reps, False, ceiling)
    if not args.skip_smollm2:
        model = load("smollm2")
        batch = smollm2_batch(model)
        # the peer's head sweep is L*T*H = ~4000 forwards a repetition: resid_pre only here
        case(model, "smollm2", batch, "resid_pre", args.smollm2_reps, False, ceiling)
        heads_extrapolated(model, batch, args.smollm2_reps, ceiling)


if __name__ == "__main__":
    main()
