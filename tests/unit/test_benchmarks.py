"""The benchmark scripts run (in ``--quick`` mode, on a tiny model) and pass their correctness gate.

Their timings are not checked here: speed is measured by running them on an idle machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _quick_rows(script: str) -> list[dict]:
    """Run ``benchmarks/<script> --quick``; it must exit 0; its JSON rows."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_tracer_benchmark_quick_mode_runs() -> None:
    rows = _quick_rows("tracer.py")
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"overhead", "stream_rss"}, rows
    assert by_case["overhead"]["gate_max_err_over_tol"] <= 1.0
    assert by_case["overhead"]["ratio_vs_plain"] > 0
    assert set(by_case["stream_rss"]["per_count"]) == {"20", "40"}


def test_heads_benchmark_quick_mode_runs() -> None:
    """benchmarks/heads.py --quick: batched head statistics equal TransformerLens's detect_head
    (every kind) and retrieval scores equal the naive Retrieval_Head-style loop, on tiny models."""
    rows = _quick_rows("heads.py")
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"tiny:detect", "tiny:detect_induction", "zoo:retrieval:retrieval"}, rows
    assert all(r["gate"] == "pass" for r in rows), rows
    assert by_case["zoo:retrieval:retrieval"]["same_generations"]
    assert by_case["zoo:retrieval:retrieval"]["answered"] > 0


@pytest.mark.real
def test_attn_stats_benchmark_quick_mode_runs() -> None:
    """benchmarks/attn_stats.py --quick (SmolLM2): find_sinks by the statistics path equals the
    pattern path at 512 tokens, the raw kernel equals a materialised softmax, and each
    (path, T) child process reports its own peak RSS, growth and time at 128 and 256 tokens."""
    rows = _quick_rows("attn_stats.py")
    gate = next(r for r in rows if r["case"] == "gate")
    assert gate["gate"] == "pass" and gate["paths"] == ["patterns", "stats"], gate
    assert max(gate["max_abs_err"].values()) <= 1e-4
    assert next(r for r in rows if r["case"] == "kernel")["gate"] == "pass"
    sinks = {(r["path"], r["T"]): r for r in rows if r["case"] == "sinks"}
    assert set(sinks) == {(p, t) for p in ("patterns", "stats") for t in (128, 256)}, rows
    for (path, _), r in sinks.items():
        assert r["path_taken"] == path and r["seconds"] > 0 and r["peak_rss_mb"] > 0
        assert r["growth_mb"] >= 0 and r["R"] == 1
    cases = {r["case"] for r in rows}
    assert {"summary_memory", "summary_time", "summary_scaling"} <= cases


def test_circuits_benchmark_quick_mode_runs() -> None:
    """benchmarks/circuits.py --quick: TransformerLens head patching (all positions and by
    position) equals mechscope's patch_sweep and the SAE is deterministic, on a tiny model and
    zoo:ioi; every row carries the peers' timings and ratios."""
    rows = _quick_rows("circuits.py")
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"tiny:toy", "zoo:ioi"}, rows
    for r in rows:
        assert r["gate"] == "pass", r
        assert r["gate_deterministic"] is True
        assert r["gate_all_pos"]["pass"] and r["gate_by_pos"]["pass"]
        assert r["gate_all_pos"]["max_abs_err"] <= r["gate_all_pos"]["tol"]
        assert r["by_pos"]["peer_patches"] == r["layers"] * r["seq_len"] * r["heads"]
        assert r["all_pos"]["peer_patches"] == r["layers"] * r["heads"]
        for peer in ("by_pos", "all_pos", "sweep"):
            assert r[peer]["ratio_peer_over_ours"] > 0
    assert 0.0 <= by_case["zoo:ioi"]["auc_circuit"] <= 1.0


def test_scale_benchmark_quick_mode_runs(ray_cluster, monkeypatch) -> None:
    """benchmarks/scale.py --quick, on the session's Ray cluster: causal traces (zoo:facts) from 2
    Ray workers with the driver's threads equal the local ones bit for bit, head statistics
    (zoo:induction) from 2 workers of 1 thread each within fp32 tolerance; every row has its
    start-up time, timings and throughput ratio."""
    from mechscope.scale import shutdown_workers

    shutdown_workers()  # this process's actors would hold the cluster's CPUs
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    rows = _quick_rows("scale.py")
    by_case = {r["case"]: r for r in rows}
    assert by_case.pop("cluster")["how"] == "connected"
    assert set(by_case) == {"zoo:induction:heads:ray2_threads1", "zoo:facts:causal:ray2"}, rows
    for r in by_case.values():
        assert r["gate"] == "pass", r
        assert r["max_abs_err"] <= r["tol"]
        assert r["workers"] == 2 and r["shards"] >= 2
        assert r["startup_s"] > 0 and r["ratio_vs_local"] > 0
        assert r["ray_items_per_s"] == r["items"] / r["ray_s"]["median"]
    assert by_case["zoo:facts:causal:ray2"]["identical_to_local"] is True
