"""Tracer benchmark: capture overhead and streaming memory (protocol: docs/ARCHITECTURE.md, "Measuring speed").

Cases (one JSON line each):

- ``overhead``: a forward with the tracer capturing heads (``hook_z``) and FFN activations
  (``mlp.hook_post``) at every layer, vs a plain bridge forward, same model, tokens, process;
  also TransformerLens's ``run_with_cache`` with the same ``names_filter`` (the peer).
  Target: ``ratio_vs_plain`` <= 1.15.
- ``stream_rss``: peak RSS while a child process streams N prompts (heads + FFN at the last
  position, float16) to disk, for N = 200 and N = 2000. The high-water mark is reset after the
  model is loaded (loading peaks higher than tracing), so the peak is the tracing's own; the
  growth over the RSS before tracing is reported too. Target: RSS independent of N.

Correctness gate first: the tracer's tensors equal ``run_with_cache``'s within
``1e-4 * max|peer| + 1e-5``.

Usage: ``python benchmarks/tracer.py [--model smollm2] [--reps 7] [--quick]``. ``--quick`` uses a
tiny native model and small counts: it checks correctness and that the script runs (CI).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import reset_peak, vm

WORDS = ("the a of to and in is was for on that with as by at from his her it an were are which "
         "this be or has had not but what all when can who there been one their more if will would "
         "about city river king music science history water light story world house school").split()


def prompts(n: int, seed: int = 0, length: int = 12) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n, length), generator=g)
    return [" ".join(WORDS[i] for i in row).capitalize() for row in idx.tolist()]


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def gate(model, tokens: torch.Tensor) -> float:
    """Max deviation between the tracer and run_with_cache, relative to the gate tolerance."""
    from mechscope.probes import Tracer, hook_for

    with Tracer(model, sites=("heads", "ffn")) as tracer:
        _, tr = tracer.forward(tokens)
    names = [hook_for(s, layer) for s in ("heads", "ffn") for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    worst = 0.0
    for site in ("heads", "ffn"):
        for layer in range(model.cfg.n_layers):
            ours, peer = tr.get(site, layer), cache[hook_for(site, layer)]
            tol = 1e-4 * float(peer.abs().max()) + 1e-5
            err = float((ours - peer).abs().max())
            if err > tol:
                raise SystemExit(f"correctness gate failed at {site}.{layer}: {err} > {tol}")
            worst = max(worst, err / tol)
    return worst


def overhead(model, spec: str, reps: int, batch: int, seq: int) -> None:
    from mechscope.probes import Tracer, hook_for

    tokens = torch.randint(1, int(model.cfg.d_vocab) - 1, (batch, seq),
                           generator=torch.Generator().manual_seed(0))
    gate_ratio = gate(model, tokens)
    names = [hook_for(s, layer) for s in ("heads", "ffn") for layer in range(model.cfg.n_layers)]

    def plain() -> None:
        with torch.no_grad():
            model(tokens)

    tracer = Tracer(model, sites=("heads", "ffn"))

    def traced() -> None:
        tracer.forward(tokens)

    def peer() -> None:
        with torch.no_grad():
            model.run_with_cache(tokens, names_filter=lambda n: n in names)

    times: dict[str, list[float]] = {"plain": [], "tracer": [], "run_with_cache": []}
    with tracer:
        for fn in (plain, traced, peer):  # warm-up
            fn()
        for _ in range(reps):  # alternate
            for name, fn in (("plain", plain), ("tracer", traced), ("run_with_cache", peer)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(case="overhead", model=spec, batch=batch, seq=seq, n_layers=int(model.cfg.n_layers),
         sites="heads+ffn, all layers", reps=reps, gate_max_err_over_tol=round(gate_ratio, 4),
         median_s={k: round(v, 5) for k, v in med.items()},
         min_s={k: round(min(v), 5) for k, v in times.items()},
         max_s={k: round(max(v), 5) for k, v in times.items()},
         ratio_vs_plain=round(med["tracer"] / med["plain"], 3),
         ratio_run_with_cache_over_tracer=round(med["run_with_cache"] / med["tracer"], 3),
         target="ratio_vs_plain <= 1.15")


def rss_child(spec: str, n: int, out: str) -> None:
    """Child process: load, stream n prompts, print peak RSS (MiB)."""
    from mechscope.models import load
    from mechscope.probes import Tracer

    model = load(spec)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Loading peaks above what tracing needs, hiding it in ru_maxrss: reset the high-water mark
    # (Linux: writing 5 to clear_refs resets VmHWM) so the peak below is the tracing's own.
    gc.collect()
    reset = reset_peak()
    start_rss = vm("VmRSS")
    texts = prompts(n) if model.tokenizer is not None else torch.randint(
        1, int(model.cfg.d_vocab), (n, 12), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with Tracer(model, sites=("heads", "ffn"), positions=(-1,), dtype="float16",
                batch_size=16) as tracer:
        tracer.run(texts, out_dir=out, progress=False)
    peak = vm("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps({"load_peak_rss_mib": round(base, 1),
                                 "rss_before_tracing_mib": round(start_rss, 1),
                                 "peak_rss_mib": round(peak, 1), "peak_reset": reset,
                                 "seconds": round(time.perf_counter() - t0, 2)}) + "\n")




def stream_rss(spec: str, counts: list[int]) -> None:
    results = {}
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), "--model", spec,
                 "--out", str(Path(tmp) / "trace")],
                capture_output=True, text=True, check=True)
            results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in (Path(tmp) / "trace").iterdir())
            results[n]["disk_mib"] = round(size / 2**20, 2)
    lo, hi = counts[0], counts[-1]
    grow = (results[hi]["peak_rss_mib"] - results[hi]["rss_before_tracing_mib"]) - (
        results[lo]["peak_rss_mib"] - results[lo]["rss_before_tracing_mib"])
    emit(case="stream_rss", model=spec, sites="heads+ffn at last position, float16",
         per_count=results,
         peak_ratio=round(results[hi]["peak_rss_mib"] / results[lo]["peak_rss_mib"], 3),
         tracing_growth_mib=round(grow, 1),
         target="peak_ratio ~ 1.0 (RSS independent of prompt count)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--counts", default="200,2000")
    ap.add_argument("--quick", action="store_true", help="tiny model, small counts (CI)")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.model, args.rss_child, args.out)
        return
    if args.quick:
        args.model = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32"
        args.reps, args.batch, args.seq, args.counts = 2, 2, 16, "20,40"
    torch.set_grad_enabled(False)
    from mechscope.models import load

    model = load(args.model)
    overhead(model, args.model, args.reps, args.batch, args.seq)
    stream_rss(args.model, [int(c) for c in args.counts.split(",")])


if __name__ == "__main__":
    main()
