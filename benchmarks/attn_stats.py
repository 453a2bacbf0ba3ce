"""Long-context attention statistics: memory and time of the statistics path vs patterns.

Cases (one JSON line each; protocol: ../shared/PERFORMANCE.md, docs/ARCHITECTURE.md "Measuring
speed"):

- ``gate``: at 512 tokens, in this process, :func:`mechscope.circuits.sinks.find_sinks` by the
  pattern path and by the statistics path (:mod:`mechscope.circuits.attn_path`) give the same
  ``scores``, ``first_share`` and ``key_scores`` within 1e-4 (fp32), else exit 1 before timing.
- ``sinks``: ``find_sinks(model, [one prompt of T tokens], path=...)`` on SmolLM2 at T = 512,
  2,048 and 8,192 tokens, by both paths. The prompt is real text: BOS + the stdlib-docstring
  haystack of ``tasks.text_retrieval`` (``mechscope.tasks._text.haystack``), exactly T tokens.
  Every (path, T, repetition) runs in a FRESH child process (this script with ``--case PATH
  T``): the child loads the model, builds the prompt, warms the path up on 16 tokens (which
  pages the weights in), resets the peak-RSS high-water mark (``/proc/self/clear_refs``), then
  runs the work once. It reports the absolute peak RSS during the work (``VmHWM`` after the
  reset; ``ru_maxrss`` beside it, which can keep an earlier peak: see :func:`_common.reset_peak`), its
  growth over the RSS before the work (model loaded, prompt built, path warm), and the work's
  wall time. R repetitions alternate the two paths; medians. The pattern case is skipped (and
  says why) when its patterns (``attn_path.pattern_bytes``) exceed ``--max-pattern-gib``.
- ``kernel``: one layer's random q/k of SmolLM2's shape at 2,048 tokens:
  :func:`mechscope.kernels.attention_stats` (the chunked torch reference on a CPU) vs the
  materialised softmax (scores, causal mask, softmax, then :func:`stats_from_pattern` for the
  same statistics); on a CUDA device, the Triton kernel vs the reference vs eager with
  ``triton.testing.do_bench``.

Then summary lines: pattern/stats peak growth at 2,048 (target >= 10x), stats/pattern time at
2,048 (target <= 1.5x), and growth(8192)/growth(2048) of the stats path (4 for linear memory, 16
for quadratic).

    python benchmarks/attn_stats.py            # SmolLM2, 512/2048/8192 tokens (~4.5 min on an idle 2-core machine)
    python benchmarks/attn_stats.py --quick    # SmolLM2, 128/256 tokens, R=1, the gate (< 60 s)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from _common import reset_peak, vm

SPEC = "smollm2"
TOL = 1e-4


def emit(row: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.flush()


def shape(model) -> dict[str, int]:
    c = model.cfg
    return {"layers": int(c.n_layers), "heads": int(c.n_heads),
            "kv_heads": int(getattr(c, "n_key_value_heads", None) or c.n_heads),
            "d_head": int(c.d_head), "d_model": int(c.d_model), "n_ctx": int(c.n_ctx)}  # fmt: skip


def prompt(model, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """``[1, n_tokens]``: BOS + ``n_tokens - 1`` tokens of the stdlib-docstring haystack that
    ``tasks.text_retrieval`` uses, from a random sentence start."""
    from mechscope.tasks._text import bos_prefix, haystack

    tok = model.tokenizer
    bos = bos_prefix(tok, True)
    hay, _ = haystack(tok, n_tokens - len(bos), np.random.default_rng(seed))
    ids = torch.tensor([bos + hay])
    assert ids.shape == (1, n_tokens), ids.shape
    return ids


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB




# -- the child: one (path, T) --------------------------------------------------------------------


def child(path: str, n_tokens: int) -> None:
    from mechscope.circuits.sinks import find_sinks
    from mechscope.models import load

    torch.set_grad_enabled(False)
    model = load(SPEC)
    ids = prompt(model, n_tokens)
    after_load = vm("VmRSS")
    # warm-up: the first forward pages the weights in (~420 MiB on SmolLM2) and sets up the path
    find_sinks(model, prompt(model, 16, seed=1), path=path, progress=False)
    load_peak = _maxrss_mb()
    gc.collect()
    reset = reset_peak()
    base = vm("VmRSS") or _maxrss_mb()
    t0 = time.perf_counter()
    res = find_sinks(model, ids, path=path, progress=False)
    seconds = time.perf_counter() - t0
    maxrss = _maxrss_mb()
    peak = vm("VmHWM") if reset else maxrss
    emit({"path": path, "T": n_tokens, "peak_rss_mb": round(peak, 1),
          "growth_mb": round(peak - base, 1), "rss_after_load_mb": round(after_load, 1),
          "rss_before_work_mb": round(base, 1),
          "ru_maxrss_mb": round(maxrss, 1), "peak_before_reset_mb": round(load_peak, 1),
          "peak_reset": reset,
          "seconds": round(seconds, 3), "path_taken": res.attention_path["path"],
          "first_share_mean": round(float(res.first_share.mean()), 4)})  # fmt: skip


def run_child(path: str, n_tokens: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--case", path, str(n_tokens)],
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"child ({path}, {n_tokens}) failed with exit code {out.returncode}")
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


# -- the gate ------------------------------------------------------------------------------------


def gate(model, n_tokens: int) -> None:
    from mechscope.circuits.sinks import find_sinks

    ids = prompt(model, n_tokens)
    pat = find_sinks(model, ids, path="patterns", progress=False)
    st = find_sinks(model, ids, path="stats", progress=False)
    errs = {}
    for name in ("scores", "first_share", "key_scores"):
        a, b = getattr(pat, name).double(), getattr(st, name).double()
        same_nan = bool((a.isnan() == b.isnan()).all())
        diff = (a - b).abs().nan_to_num(0.0)
        errs[name] = float(diff.max()) if same_nan else float("inf")
    ok = all(e <= TOL for e in errs.values()) and st.attention_path["path"] == "stats"
    emit({"case": "gate", "T": n_tokens, "gate": "pass" if ok else "FAIL", "tol": TOL,
          "max_abs_err": errs, "paths": [pat.attention_path["path"], st.attention_path["path"]],
          "same_heads": pat.heads == st.heads, **shape(model)})  # fmt: skip
    if not ok:
        sys.exit(1)


# -- the raw kernel ------------------------------------------------------------------------------


def _eager_stats(q: torch.Tensor, k: torch.Tensor, scale: float):
    from mechscope.kernels import stats_from_pattern

    n = q.shape[2]
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scale
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return stats_from_pattern(torch.softmax(s, dim=-1), queries=[-1])


def _time(fn, reps: int) -> dict[str, float]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts)}


def kernel_case(sh: dict[str, int], n_tokens: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, sh["heads"], n_tokens, sh["d_head"], generator=g)
    k = torch.randn(1, sh["kv_heads"], n_tokens, sh["d_head"], generator=g)
    scale = sh["d_head"] ** -0.5

    ours = _backend("reference", q, k, scale)

    def eager():
        return _eager_stats(q, k, scale)

    a, b = ours(), eager()  # also the warm-up
    err = float((a.received - b.received).abs().max())
    tol = TOL * float(b.received.abs().max()) + 1e-5
    same_arg = bool((a.argmax == b.argmax).all())
    row: dict[str, Any] = {"case": "kernel", "device": "cpu", "T": n_tokens, **sh,
                           "gate": "pass" if err <= tol and same_arg else "FAIL",
                           "max_abs_err_received": err, "tol": tol,
                           "pattern_mb": sh["heads"] * n_tokens**2 * 4 / 2**20}  # fmt: skip
    if row["gate"] == "FAIL":
        emit(row)
        sys.exit(1)
    tr, te = [], []
    for _ in range(reps):  # alternate
        tr.append(_time(ours, 1)["median"])
        te.append(_time(eager, 1)["median"])
    row |= {"R": reps, "reference_s": {"median": statistics.median(tr), "min": min(tr), "max": max(tr)},
            "eager_s": {"median": statistics.median(te), "min": min(te), "max": max(te)},
            "ratio_eager_over_reference": statistics.median(te) / statistics.median(tr)}  # fmt: skip
    emit(row)
    if torch.cuda.is_available():
        kernel_cuda(sh, n_tokens)


def kernel_cuda(sh: dict[str, int], n_tokens: int) -> None:
    """Triton kernel vs reference vs eager on the GPU, ``triton.testing.do_bench`` (ms)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        emit({"case": "kernel_cuda", "skipped": "triton is not installed"})
        return
    for n in sorted({n_tokens, 8192, 32768}):
        _cuda_case(sh, n, do_bench)


def _backend(name: str, q: torch.Tensor, k: torch.Tensor, scale: float):
    from mechscope.kernels import attention_stats

    def fn():
        os.environ["MECHSCOPE_KERNELS"] = name  # read by the dispatch at each call
        try:
            return attention_stats(q, k, scale=scale, queries=[-1])
        finally:
            os.environ.pop("MECHSCOPE_KERNELS", None)

    return fn


def _cuda_case(sh: dict[str, int], n: int, do_bench) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, sh["heads"], n, sh["d_head"], device="cuda", generator=g)
    k = torch.randn(1, sh["kv_heads"], n, sh["d_head"], device="cuda", generator=g)
    scale = sh["d_head"] ** -0.5
    tri, ref = _backend("triton", q, k, scale), _backend("reference", q, k, scale)
    a, b = tri(), ref()
    err = float((a.received - b.received).abs().max())
    tol = TOL * float(b.received.abs().max()) + 1e-5
    same_arg = bool((a.argmax == b.argmax).all())
    row: dict[str, Any] = {"case": "kernel_cuda", "device": torch.cuda.get_device_name(), "T": n,
                           **sh, "gate": "pass" if err <= tol and same_arg else "FAIL",
                           "max_abs_err_received": err, "tol": tol}  # fmt: skip
    if row["gate"] == "FAIL":
        emit(row)
        sys.exit(1)
    row["triton_ms"], row["reference_ms"] = do_bench(tri), do_bench(ref)
    row["ratio_reference_over_triton"] = row["reference_ms"] / row["triton_ms"]
    eager_bytes = 2 * sh["heads"] * n * n * 4
    if eager_bytes < 0.5 * torch.cuda.mem_get_info()[0]:
        row["eager_ms"] = do_bench(lambda: _eager_stats(q, k, scale))
        row["ratio_eager_over_triton"] = row["eager_ms"] / row["triton_ms"]
    else:
        row["eager_ms"] = f"skipped: scores + pattern need {eager_bytes / 2**30:.1f} GiB"
    emit(row)


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=128,256, R=1, the gate (< 60 s)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--reps", type=int, default=3, help="repetitions below 8,192 tokens")
    ap.add_argument("--long-reps", type=int, default=1, help="repetitions at >= 8,192 tokens")
    ap.add_argument("--gate-tokens", type=int, default=512)
    ap.add_argument("--kernel-tokens", type=int, default=2048)
    ap.add_argument("--max-pattern-gib", type=float, default=14.0)
    ap.add_argument("--case", nargs=2, metavar=("PATH", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        child(args.case[0], int(args.case[1]))
        return
    if args.quick:
        args.lengths, args.reps, args.long_reps, args.kernel_tokens = [128, 256], 1, 1, 256
    from mechscope.circuits.attn_path import pattern_bytes
    from mechscope.models import load

    torch.set_grad_enabled(False)
    model = load(SPEC)
    sh = shape(model)
    gate(model, args.gate_tokens)
    kernel_case(sh, args.kernel_tokens, 3 if not args.quick else 1)
    need = {n: pattern_bytes(model, n) for n in args.lengths}
    del model
    gc.collect()
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for n in args.lengths:
        paths = ["patterns", "stats"]
        if need[n] > args.max_pattern_gib * 2**30:
            paths = ["stats"]
            emit({"case": "sinks", "path": "patterns", "T": n, "skipped": True,
                  "why": f"the patterns need ~{need[n] / 2**30:.1f} GiB (attn_path.pattern_bytes), "
                         f"over --max-pattern-gib {args.max_pattern_gib:g}", **sh})  # fmt: skip
        reps = args.long_reps if n >= 8192 else args.reps
        for r in range(reps):
            for path in paths if r % 2 == 0 else paths[::-1]:  # alternate the order
                results.setdefault((path, n), []).append(run_child(path, n))
        for path in paths:
            runs = results[(path, n)]
            med = {key: statistics.median(x[key] for x in runs)
                   for key in ("peak_rss_mb", "growth_mb", "seconds")}  # fmt: skip
            emit({"case": "sinks", "path": path, "T": n, **med, "R": reps,
                  "seconds_min": min(x["seconds"] for x in runs),
                  "seconds_max": max(x["seconds"] for x in runs),
                  "growth_mb_max": max(x["growth_mb"] for x in runs),
                  "pattern_bytes_estimate_mb": round(need[n] / 2**20, 1),
                  "rss_before_work_mb": statistics.median(x["rss_before_work_mb"] for x in runs),
                  "ru_maxrss_mb": statistics.median(x["ru_maxrss_mb"] for x in runs),
                  "path_taken": runs[0]["path_taken"], "peak_reset": runs[0]["peak_reset"],
                  "first_share_mean": runs[0]["first_share_mean"], **sh})  # fmt: skip
    summary(results, args.lengths)


def summary(results: dict[tuple[str, int], list[dict[str, Any]]], lengths: list[int]) -> None:
    def med(path: str, n: int, key: str) -> float | None:
        runs = results.get((path, n))
        return statistics.median(x[key] for x in runs) if runs else None

    mid = 2048 if 2048 in lengths else lengths[-1]
    gp, gs = med("patterns", mid, "growth_mb"), med("stats", mid, "growth_mb")
    tp, ts = med("patterns", mid, "seconds"), med("stats", mid, "seconds")
    if gp is not None and gs is not None and tp is not None and ts is not None:
        ratio = gp / max(gs, 1e-9)
        emit({"case": "summary_memory", "T": mid, "pattern_growth_mb": gp, "stats_growth_mb": gs,
              "ratio_pattern_over_stats": round(ratio, 2), "target": ">= 10x",
              "met": ratio >= 10})  # fmt: skip
        emit({"case": "summary_time", "T": mid, "pattern_s": tp, "stats_s": ts,
              "ratio_stats_over_pattern": round(ts / tp, 3), "target": "<= 1.5x",
              "met": ts / tp <= 1.5})  # fmt: skip
    growth = {n: med("stats", n, "growth_mb") for n in lengths}
    per_token = {n: round(g / n * 1024, 2) for n, g in growth.items() if g is not None}
    row: dict[str, Any] = {"case": "summary_scaling", "stats_growth_mb": growth,
                           "stats_growth_kb_per_token": per_token}  # fmt: skip
    lo, hi = (2048, 8192) if {2048, 8192} <= set(lengths) else (lengths[-2], lengths[-1])
    g_lo, g_hi = growth.get(lo), growth.get(hi)
    if g_lo and g_hi:
        f = hi / lo
        row |= {"from": lo, "to": hi, "growth_ratio": round(g_hi / g_lo, 2),
                "linear_would_be": f, "quadratic_would_be": f * f}  # fmt: skip
    emit(row)


if __name__ == "__main__":
    main()
