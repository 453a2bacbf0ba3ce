"""The command line as a new user meets it: a separate process, its exit status, its stderr, Ctrl-C.

Ctrl-C is a real SIGINT sent to the child once it is provably inside the run (a wrapper around
``mechscope.cli.main`` slows one step down and says so on stderr), so the test cannot race it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import TINY

CLI = [sys.executable, "-m", "mechscope.cli"]
READY = "mechscope-test: ready to be interrupted"


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt; give the child the default disposition a terminal gives.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=Path(__file__).resolve().parents[2])


def _interrupt(patch: str, argv: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run ``main(argv)`` in a child whose ``patch`` code makes one step print READY and sleep;
    send SIGINT once READY shows on stderr; return (status, stderr)."""
    script = tmp_path / "slow_cli.py"
    script.write_text(textwrap.dedent(patch) + textwrap.dedent(f"""
        from mechscope.cli import main
        main({argv!r})
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_default_sigint)
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stderr:  # blocks until the child writes; READY comes within seconds
            seen.append(line)
            if READY in line or time.monotonic() > deadline:
                break
        assert any(READY in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + rest


def _slow(module: str, name: str) -> str:
    """A patch for :func:`_interrupt`: ``module.name`` says READY and sleeps before it runs."""
    return f"""
        import importlib, sys, time
        _mod = importlib.import_module({module!r})
        _orig = getattr(_mod, {name!r})

        def _slow(*args, **kwargs):
            sys.stderr.write({READY!r} + "\\n")
            sys.stderr.flush()
            time.sleep(120)
            return _orig(*args, **kwargs)

        setattr(_mod, {name!r}, _slow)
    """


def test_ctrl_c_during_demo_exits_130_and_leaves_a_failed_run(tmp_path):
    store = tmp_path / "store"
    # The first result's tensors are staged when the demo stops to wait for Ctrl-C.
    patch = f"""
        import sys, time
        from mechscope.store import RunWriter
        _add = RunWriter.add_tensors

        def slow_add(self, name, tensors):
            _add(self, name, tensors)
            sys.stderr.write({READY!r} + "\\n")
            sys.stderr.flush()
            time.sleep(120)

        RunWriter.add_tensors = slow_add
    """
    code, err = _interrupt(patch, ["demo", "--model", TINY, "--store", str(store)], tmp_path)
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    con = sqlite3.connect(store / "store.db")
    try:
        runs = con.execute("SELECT status, error FROM runs").fetchall()
        results = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        con.close()
    assert len(runs) == 1 and runs[0][0] == "failed" and "KeyboardInterrupt" in runs[0][1]
    assert results == 0
    assert not [p for p in store.rglob("*") if p.is_file() and p.suffix == ".safetensors"]


def test_ctrl_c_during_trace_exits_130(tmp_path):
    out = tmp_path / "trace"
    patch = f"""
        import sys, time
        from mechscope.models import loading
        _native = loading.SPEC_KINDS["native"]

        def slow_native(body, device):
            model = _native(body, device)
            sys.stderr.write({READY!r} + "\\n")
            sys.stderr.flush()
            time.sleep(120)
            return model

        loading.SPEC_KINDS["native"] = slow_native
    """
    code, err = _interrupt(patch, ["trace", TINY, "--tokens", "1,2,3", "--out", str(out)],
                           tmp_path)
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bogus"], "No such command 'bogus'"),
        (["trace"], "Missing argument"),
        (["trace", TINY, "--bogus"], "No such option: --bogus"),
        (["zoo", "train"], "Missing argument"),
        (["zoo", "bogus"], "No such command 'bogus'"),
        (["zoo", "train", "induction", "--steps", "many"], "'--steps'"),
        (["runs", "--store"], "requires an argument"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(argv, words):
    proc = _run(*argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert "--help" in lines[0]  # and it says where the help is


@pytest.mark.parametrize("argv", [[], ["zoo"]])
def test_bare_command_prints_its_help_with_status_2(argv):
    proc = _run(*argv)
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "Usage: mechscope" in text
    assert ("train" in text and "list" in text) if argv else ("demo" in text and "zoo" in text)


def test_entry_point_script_reports_errors_as_one_line():
    script = Path(sys.executable).with_name("mechscope")
    if not script.is_file():
        pytest.fail(f"the mechscope entry point is not installed next to {sys.executable}; "
                    "run `pip install -e .`")
    proc = subprocess.run([str(script), "trace", "no-such-model", "--prompt", "x"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown model spec") and proc.stderr.count("\n") == 1


def test_output_piped_into_a_reader_that_leaves_is_not_a_traceback():
    """`mechscope patch --help | head -1`: the reader closes the pipe early; no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mechscope.cli", "patch", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader leaves before the help is written out
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err, err.decode()[-2000:]


def test_ctrl_c_during_a_heads_analysis_exits_130(tmp_path):
    patch = _slow("mechscope.circuits.sinks", "find_sinks")
    code, err = _interrupt(patch, ["heads", "sinks", "zoo:retrieval", "--store",
                                   str(tmp_path / "s")], tmp_path)  # fmt: skip
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()  # nothing was written before the result existed


def test_ctrl_c_during_sae_training_exits_130(tmp_path):
    patch = _slow("mechscope.circuits.sae", "train_sae")
    code, err = _interrupt(patch, ["circuits", "sae", "zoo:ioi", "--store", str(tmp_path / "s")],
                           tmp_path)  # fmt: skip
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_ctrl_c_during_discover_exits_130_and_leaves_a_failed_run_and_no_report(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('model = "zoo:ioi"\nanalyses = ["sinks"]\n')
    store = tmp_path / "s"
    code, err = _interrupt(_slow("mechscope.circuits.sinks", "default_run"),
                           ["discover", str(spec), "--store", str(store)], tmp_path)  # fmt: skip
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    con = sqlite3.connect(store / "store.db")
    try:
        runs = con.execute("SELECT kind, status FROM runs").fetchall()
        results = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        con.close()
    assert runs == [("discover", "failed")] and results == 0
    assert not (store / "reports").exists()


def test_ctrl_c_during_report_exits_130_and_writes_nothing(tmp_path):
    store = tmp_path / "s"
    done = _run("demo", "--model", TINY, "--store", str(store), "--no-attribution", "--no-heads",
                "--no-circuits", "--no-report")  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out" / "report.html"
    code, err = _interrupt(_slow("mechscope.report", "sections"),
                           ["report", "--store", str(store), "--out", str(out)], tmp_path)
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no report, no temp file


def test_ctrl_c_during_a_ray_sweep_exits_130_and_saves_nothing(tmp_path):
    """Ctrl-C while the shards run on Ray actors (the driver waits on them): one line, 130, no run."""
    patch = f"""
        import sys, time
        import ray
        _wait = ray.wait

        def slow_wait(refs, *args, **kwargs):
            if kwargs.get("timeout") == 0.5:  # the sweep loop: shards are running on the actors
                sys.stderr.write({READY!r} + "\\n")
                sys.stderr.flush()
                time.sleep(120)
            return _wait(refs, *args, **kwargs)

        ray.wait = slow_wait
    """
    store = tmp_path / "s"
    code, err = _interrupt(patch, ["heads", "stats", "zoo:induction", "--n", "8", "--backend",
                                   "ray", "--workers", "2", "--shard-size", "4", "--store",
                                   str(store)], tmp_path)  # fmt: skip
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert not store.exists()  # the result is saved only once the sweep is merged


def test_ctrl_c_during_a_causal_trace_over_facts_exits_130(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": [0, 5, 6, 7], "subject": [1, 3]}\n')
    code, err = _interrupt(_slow("mechscope.attribution.causal_sweep", "trace_facts"),
                           ["causal-trace", "zoo:facts", "--facts", str(facts), "--store",
                            str(tmp_path / "s")], tmp_path)  # fmt: skip
    assert code == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()
