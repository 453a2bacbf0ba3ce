"""Batched causal tracing vs ROME's reference loop (one forward per (token, layer)).

The peer follows kmeng01/rome ``experiments/causal_trace.py`` (``trace_with_patch``): one forward
per (token, layer) of N+1 rows (row 0 clean, rows 1..N noisy), the noise added to the subject's
token embeddings (``hook_embed``) and the clean row's state copied into the noisy rows by plain
TransformerLens hooks (``run_with_hooks``), p(target) averaged over the noisy rows. Both sides get
the same noise (``subject_noise(..., seed=0)``), the same sigma and target. Per PERFORMANCE.md:
fp32 gate first (exit 1 on failure, before timing), warm-up, alternating repetitions, medians,
min, max and peer/ours, the work (variants U, skipped no-ops, forwards, rows) beside the time,
achieved GFLOP/s beside a 2048^3 fp32 matmul measured in this run. One JSON line per case.

    python benchmarks/causal_trace.py            # zoo:facts (hidden, mlp) and SmolLM2 (hidden)
    python benchmarks/causal_trace.py --quick    # tiny native model, gate only
    python benchmarks/causal_trace.py --skip-zoo --smollm2-reps 0   # SmolLM2 gate + one timing

``gate_peer_s``/``gate_ours_s`` are the single (cold) runs of the gate, not a benchmark figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from _common import _time, forward_flops, matmul_gflops
from mechscope.attribution.causal_trace import causal_trace, window_layers
from mechscope.kernels.noise import subject_noise
from mechscope.models import load

TINY = "native:n_layers=3,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=16,seed=1"
HOOK = {"hidden": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out",
        "attn": "blocks.{}.hook_attn_out"}  # fmt: skip


def rome_loop(model, tokens, span, target, *, kind, window, samples, nu, seed):
    """ROME's loop: for each (token, layer) one forward of [clean, noisy x N] with hooks."""
    n_layers, n_pos = int(model.cfg.n_layers), tokens.numel()
    noise = subject_noise(samples, span[1] - span[0], int(model.cfg.d_model), seed=seed)
    batch = tokens[None].repeat(samples + 1, 1)

    def embed(x, hook):
        x = x.clone()
        x[1:, span[0] : span[1]] += nu * noise.to(x.dtype)
        return x

    def restore(t):
        def fn(h, hook):
            h = h.clone()
            h[1:, t] = h[0, t]
            return h
        return fn

    out = torch.zeros(n_layers, n_pos, dtype=torch.float64)
    for layer in range(n_layers):
        layers = [layer] if kind == "hidden" else window_layers(layer, n_layers, window)
        for t in range(n_pos):
            hooks = [("hook_embed", embed)] + [(HOOK[kind].format(ly), restore(t)) for ly in layers]
            logits = model.run_with_hooks(batch, fwd_hooks=hooks)
            out[layer, t] = torch.softmax(logits[1:, -1].double(), -1)[:, target].mean()
    return out


def case(model, name, tokens, span, target, kind, reps, quick, ceiling, samples=10) -> dict:
    def ours():
        return causal_trace(model, tokens, span, target=target, kind=kind, samples=samples,
                            progress=False)  # fmt: skip

    t0 = time.perf_counter()
    got = ours()
    t_ours = time.perf_counter() - t0

    def peer():
        return rome_loop(model, tokens, span, got.target, kind=kind, window=10, samples=samples,
                         nu=got.noise * got.sigma, seed=0)  # fmt: skip

    t0 = time.perf_counter()
    want = peer()
    t_peer = time.perf_counter() - t0
    err = float((got.scores.double() - want).abs().max())
    tol = 1e-4 * float(want.abs().max()) + 1e-5
    n_layers, n_pos = want.shape
    u = n_layers * n_pos
    row = {"case": f"{name}:{kind}", "peer": "ROME trace_with_patch loop (run_with_hooks)",
           "gate": "pass" if err <= tol else "FAIL", "max_abs_err": err, "tol": tol,
           "U": u, "skipped": got.n_skipped, "samples": samples, "seq_len": n_pos,
           "layers": n_layers, "d_model": int(model.cfg.d_model), "p_clean": got.p_clean,
           "p_corrupt": got.p_corrupt, "argmax_layer_pos": list(got.argmax()),
           "forwards_ours": got.work["forwards"], "rows_ours": got.work["rows"],
           "forwards_peer": u, "rows_peer": u * (samples + 1),
           "gate_peer_s": t_peer, "gate_ours_s": t_ours}  # fmt: skip
    if err > tol:
        print(json.dumps(row), flush=True)
        sys.exit(1)
    if not quick and reps > 0:
        peer(), ours()  # warm-up
        tp, to = [], []
        for _ in range(reps):
            tp.append(_time(peer))
            to.append(_time(ours))
        f1 = forward_flops(model, 1, n_pos)
        row |= {"R": reps, "peer_s": {"median": statistics.median(tp), "min": min(tp), "max": max(tp)},
                "ours_s": {"median": statistics.median(to), "min": min(to), "max": max(to)},
                "ratio_peer_over_ours": statistics.median(tp) / statistics.median(to),
                "ours_gflops": f1 * got.work.get("flops_vs_naive", 1.0) * row["rows_peer"] / statistics.median(to) / 1e9,
                "flops_vs_naive": got.work.get("flops_vs_naive"), "path": got.work.get("path"),
                "peer_gflops": f1 * row["rows_peer"] / statistics.median(tp) / 1e9,
                "matmul_2048_fp32_gflops": ceiling}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny native model, gate only")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smollm2-reps", type=int, default=5)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-zoo", action="store_true")
    ap.add_argument("--smollm2-samples", type=int, default=10, help="noise samples (ROME: 10)")
    ap.add_argument("--smollm2-kinds", default="hidden", help="comma-separated: hidden,mlp,attn")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.quick:
        model = load(TINY)
        tokens = torch.tensor([3, 17, 5, 9, 22, 41, 8])
        for kind in ("hidden", "mlp"):
            case(model, "tiny", tokens, (1, 4), None, kind, 0, True, 0.0, samples=3)
        return
    ceiling = matmul_gflops()
    from mechscope.models.zoo.data import facts_eval
    from mechscope.models.zoo.recipes import RECIPES

    batch = facts_eval(RECIPES["facts"], 4, seed=0)[-1]
    tokens = batch.clean[0][: int(batch.answer_pos[0]) + 1]
    model = load("zoo:facts")
    for kind in () if args.skip_zoo else ("hidden", "mlp"):
        case(model, "zoo:facts", tokens, (1, tokens.numel() - 1), int(batch.answer[0]), kind,
             args.reps, False, ceiling)  # fmt: skip
    if not args.skip_smollm2:
        model = load("smollm2")
        text = "The Eiffel Tower is located in the city of"
        tokens = model.to_tokens(text, truncate=False, move_to_device=False)[0]
        from mechscope.attribution.prompts import _subject_span

        span = _subject_span(model, tokens, "The Eiffel Tower")
        for kind in args.smollm2_kinds.split(","):
            case(model, "smollm2", tokens, span, " Paris", kind, args.smollm2_reps, False, ceiling,
                 samples=args.smollm2_samples)  # fmt: skip


if __name__ == "__main__":
    main()
