"""Helpers shared by the benchmarks: the machine's matmul ceiling, timing, forward FLOPs.

Imported by the scripts beside it (``python benchmarks/<name>.py`` puts this folder on
``sys.path``); protocol in docs/ARCHITECTURE.md, "Measuring speed".
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def forward_flops(model, rows: int, n_pos: int) -> float:
    """Matmul FLOPs of one forward of ``rows`` x ``n_pos`` tokens (2 * params-in-matmuls + attn)."""
    c = model.cfg
    d, h, dh, L = int(c.d_model), int(c.n_heads), int(c.d_head), int(c.n_layers)
    kv = int(getattr(c, "n_key_value_heads", None) or h)
    mlp = 0 if c.attn_only else (3 if getattr(c, "gated_mlp", False) else 2) * d * int(c.d_mlp)
    per_tok = L * (d * h * dh * 2 + 2 * d * kv * dh + mlp + 2 * h * dh * n_pos) + d * int(c.d_vocab)
    return 2.0 * rows * n_pos * per_tok


def vm(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (``VmRSS``, ``VmHWM``; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux: ``VmHWM``); False where it cannot be. ``ru_maxrss``
    is not a clean measure in a child: it is also the maximum of a per-process figure this reset
    does not clear, which the kernel sets at ``exec`` from the forked image (the parent's RSS when
    it spawned the child) and when a thread exits. So a case's own peak is read from ``VmHWM``."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
