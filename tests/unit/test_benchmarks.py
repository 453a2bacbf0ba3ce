"""The benchmark scripts run (in ``--quick`` mode, on a tiny model) and pass their correctness gate.

Their timings are not checked here: speed is measured by running them on an idle machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tracer_benchmark_quick_mode_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tracer.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"overhead", "stream_rss"}, rows
    assert by_case["overhead"]["gate_max_err_over_tol"] <= 1.0
    assert by_case["overhead"]["ratio_vs_plain"] > 0
    assert set(by_case["stream_rss"]["per_count"]) == {"20", "40"}


def test_heads_benchmark_quick_mode_runs() -> None:
    """benchmarks/heads.py --quick: batched head statistics equal TransformerLens's detect_head
    (every kind) and retrieval scores equal the naive Retrieval_Head-style loop, on tiny models."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "heads.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"tiny:detect", "tiny:detect_induction", "zoo:retrieval:retrieval"}, rows
    assert all(r["gate"] == "pass" for r in rows), rows
    assert by_case["zoo:retrieval:retrieval"]["same_generations"]
    assert by_case["zoo:retrieval:retrieval"]["answered"] > 0
