"""Kernel benchmark: the Triton kernels of ``mechscope.kernels`` against their torch references.

Cases (one JSON line each): ``scatter_resid`` (patch V variants of a ``[batch, pos, d_model]``
site, one position each), ``scatter_heads`` (``[batch, pos, head, d_head]``, one (position, head)
each) and ``noise`` (causal-tracing corruption of ``[N, pos, d_model]`` embeddings, 4 subject
positions). The work is reported beside the time (bytes moved by the op); the scatter's times
include the clone of the variants buffer that keeps repetitions independent, on both sides.

Correctness gate first, on every case: the kernel's output equals the reference's (exactly for
the scatter, a copy; within ``1e-4 * max|ref| + 1e-5`` for the noise add, fp32), else the script
exits non-zero before timing anything. The reference is imported from the package, as the tests
import it.

Timing: on a CUDA device both sides with ``triton.testing.do_bench`` (medians; ratio
``reference / kernel``). On a CPU the kernel can only run in Triton's interpreter: the reference
is timed (median, min, max over ``--reps``) and the interpreter run, on a small shape, is reported
as ``"informative only"`` (it measures the interpreter, not the kernel).

Usage: ``python benchmarks/triton_kernels.py [--reps 7] [--quick]``; ``--quick`` checks correctness on
small shapes only and times nothing (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels are jitted on first use

from mechscope.kernels.noise import reference as noise_ref  # noqa: E402
from mechscope.kernels.noise import subject_noise  # noqa: E402
from mechscope.kernels.patch_scatter import reference as scatter_ref  # noqa: E402


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def make_case(name: str, size: str, device: str):
    """``(reference_fn, kernel_fn, bytes_moved, shape)`` for one case; each fn returns its output."""
    from mechscope.kernels.noise import triton as noise_tri
    from mechscope.kernels.patch_scatter import triton as scatter_tri

    g = torch.Generator().manual_seed(0)
    big = size == "big"
    if name.startswith("scatter"):
        heads = name == "scatter_heads"
        n_var, n_batch, n_pos = (96, 8, 48) if big else (5, 3, 7)
        site = ((12, 64) if big else (3, 13)) if heads else ((768,) if big else (13,))
        shape = (n_var, n_batch, n_pos, *site)
        base = torch.randn(shape, generator=g).to(device)
        clean = torch.randn(shape[1:], generator=g).to(device)
        pos = torch.randint(0, n_pos, (n_var,), generator=g).to(device)
        hd = torch.randint(0, site[0], (n_var,), generator=g).to(device) if heads else None
        work = 2 * n_var * n_batch * site[-1] * clean.element_size()

        def ref():
            return scatter_ref.scatter_patches(base.clone(), clean, pos, hd)

        def ker():
            return scatter_tri.scatter_patches(base.clone(), clean, pos, hd)

        return ref, ker, work, shape
    n_rows, n_pos, d = (10, 64, 1600) if big else (3, 17, 13)
    embeds = torch.randn(n_rows, n_pos, d, generator=g).to(device)
    mask = torch.zeros(n_rows, n_pos, dtype=torch.bool, device=device)
    mask[:, 2:6] = True
    noise = subject_noise(n_rows, 4, d, seed=1, device=device)
    slots = noise_ref.slots_from_mask(mask, 4)
    work = 2 * embeds.numel() * embeds.element_size() + noise.numel() * noise.element_size()
    return (
        lambda: noise_ref.add_subject_noise(embeds, noise, slots, 3.0),
        lambda: noise_tri.add_subject_noise(embeds, noise, slots, 3.0),
        work,
        (n_rows, n_pos, d),
    )


def gate(name: str, ref, ker) -> float:
    """Max |kernel - reference| over the tolerance; exits non-zero when it fails."""
    r, k = ref(), ker()
    err = float((k.float() - r.float()).abs().max()) if r.numel() else 0.0
    tol = 0.0 if name.startswith("scatter") else 1e-4 * float(r.abs().max()) + 1e-5
    if err > tol:
        raise SystemExit(f"correctness gate failed for {name}: max err {err} > {tol}")
    return err / tol if tol else err


def wall(fn, reps: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="correctness only, small shapes")
    args = parser.parse_args()
    device = "cuda" if CUDA else "cpu"
    for name in ("scatter_resid", "scatter_heads", "noise"):
        small_ref, small_ker, _, small_shape = make_case(name, "small", device)
        small_gate = gate(name, small_ref, small_ker)
        if args.quick:
            emit(case=name, device=device, shape=small_shape, gate_err_over_tol=small_gate)
            continue
        row: dict = {"case": name, "device": device}
        if CUDA:
            from triton.testing import do_bench

            ref, ker, work, shape = make_case(name, "big", device)
            row["gate_err_over_tol"] = gate(name, ref, ker)
            t_ref, t_ker = do_bench(ref), do_bench(ker)  # ms, medians
            row |= {
                "shape": shape,
                "bytes": work,
                "reference_ms": t_ref,
                "kernel_ms": t_ker,
                "ratio_reference_over_kernel": t_ref / t_ker,
                "kernel_GBps": work / (t_ker * 1e-3) / 1e9,
            }
        else:
            ref, _, work, shape = make_case(name, "big", device)
            times = wall(ref, args.reps)
            interp = wall(small_ker, 1)[0]
            row |= {
                "shape": shape,
                "bytes": work,
                "gate_err_over_tol": small_gate,
                "reference_ms_median": 1e3 * statistics.median(times),
                "reference_ms_min": 1e3 * min(times),
                "reference_ms_max": 1e3 * max(times),
                "interpreter_shape": small_shape,
                "interpreter_ms": 1e3 * interp,
                "interpreter_note": "informative only: Triton's CPU interpreter, not the kernel",
            }
        emit(**row)


if __name__ == "__main__":
    main()
