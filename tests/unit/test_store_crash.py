"""The run store after crashes: a writer opening the store removes tensor folders that no complete
or live run owns, and leaves complete runs (and their tensors) intact."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from mechscope.store import Store

KEPT = torch.arange(6.0).reshape(2, 3)


def _complete_run(store: Store) -> str:
    with store.run("kept") as run:
        run.add_tensors("acts", {"z": KEPT})
        run.add_table("rows", [{"x": 1}])
    return run.id


def _assert_kept_run_intact(store: Store, run_id: str) -> None:
    assert store.get_run(run_id).status == "complete"
    torch.testing.assert_close(store.tensors(run_id, "acts")["z"], KEPT)
    assert store.table(run_id, "rows").to_dict("records") == [{"x": 1}]




def _die_between_move_and_commit(root: str, ids_file: str) -> None:
    store = Store(root)
    ids = {"kept": _complete_run(store)}
    real_replace = os.replace

    def replace_then_die(src, dst):  # the staging folder is moved into place; then power cut
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die
    with store.run("crashed") as run:
        ids["crashed"] = run.id
        run.add_tensors("acts", {"z": torch.ones(3)})
        Path(ids_file).write_text(json.dumps(ids))
    raise AssertionError("the process should have died in the commit")


def _die_mid_run(root: str, ids_file: str) -> None:
    store = Store(root)
    ids = {"kept": _complete_run(store)}
    with store.run("killed") as run:
        ids["killed"] = run.id
        run.add_tensors("acts", {"z": torch.ones(3)})
        run.add_tensors("more", {"z": torch.ones(3)})
        tmp = Path(ids_file + ".tmp")
        tmp.write_text(json.dumps(ids))
        os.replace(tmp, ids_file)
        time.sleep(600)  # killed here, with its staging folder on disk


def test_crash_between_moving_tensors_and_commit_leaves_no_orphan(tmp_path):
    root = tmp_path / "store"
    ids_file = tmp_path / "ids.json"
    proc = mp.get_context("spawn").Process(target=_die_between_move_and_commit,
                                           args=(str(root), str(ids_file)))
    proc.start()
    proc.join(timeout=240)
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    ids = json.loads(ids_file.read_text())
    orphan = root / "tensors" / ids["crashed"]
    # The crash left the moved folder behind a run that is still 'running' ...
    assert (orphan / "acts.safetensors").is_file()
    reader = Store(root, readonly=True)
    assert reader.get_run(ids["crashed"]).status == "running"
    assert orphan.exists()  # ... and a reader leaves everything as it is.

    store = Store(root)
    rec = store.get_run(ids["crashed"])
    assert rec.status == "failed" and "died" in rec.error
    assert not orphan.exists()
    assert sorted(p.name for p in (root / "tensors").iterdir()) == [ids["kept"]]
    _assert_kept_run_intact(store, ids["kept"])


def test_writer_killed_mid_run_leaves_no_staging_folder(tmp_path):
    root = tmp_path / "store"
    ids_file = tmp_path / "ids.json"
    proc = mp.get_context("spawn").Process(target=_die_mid_run, args=(str(root), str(ids_file)))
    proc.start()
    deadline = time.monotonic() + 240
    while not ids_file.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: its results are staged, nothing committed
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    ids = json.loads(ids_file.read_text())
    staging = root / "tensors" / f".staging-{ids['killed']}"
    assert (staging / "more.safetensors").is_file()  # what SIGKILL left behind

    store = Store(root)
    rec = store.get_run(ids["killed"])
    assert rec.status == "failed" and "died" in rec.error
    assert sorted(p.name for p in (root / "tensors").iterdir()) == [ids["kept"]]
    _assert_kept_run_intact(store, ids["kept"])


def test_commit_that_fails_after_the_move_removes_the_moved_tensors(tmp_path):
    store = Store(tmp_path)
    kept = _complete_run(store)
    real = store._transaction
    calls = []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real()

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"), store.run("x") as run:
        run.add_tensors("acts", {"z": torch.ones(2)})
        store._transaction = failing_once  # type: ignore[method-assign]
    assert not (tmp_path / "tensors" / run.id).exists()
    assert store.get_run(run.id).status == "failed"
    assert store.result_names(run.id) == {}
    _assert_kept_run_intact(store, kept)


def test_open_removes_exactly_the_folders_no_complete_or_live_run_owns(tmp_path):
    """Every kind of leftover at once, next to folders that must stay."""
    store = Store(tmp_path)
    kept = _complete_run(store)
    tensors = tmp_path / "tensors"

    def fake_run(status: str, host: str, pid: int) -> str:
        with store.run("fake") as run:
            run.add_tensors("acts", {"z": torch.ones(1)})
        con = sqlite3.connect(tmp_path / "store.db")
        with con:
            con.execute("UPDATE runs SET status = ?, host = ?, pid = ? WHERE id = ?",
                        (status, host, pid, run.id))
        con.close()
        (tensors / f".staging-{run.id}").mkdir()
        (tensors / f".staging-{run.id}" / "x.safetensors").write_bytes(b"x")
        return run.id

    failed = fake_run("failed", socket.gethostname(), os.getpid())
    live = fake_run("running", socket.gethostname(), os.getpid())  # this process: alive
    remote = fake_run("running", "another-host", 1)  # cannot tell: keep
    rowless = "20240101-000000-deadbeef"
    for name in (rowless, f".staging-{rowless}", "notes", ".staging-notes"):
        (tensors / name).mkdir()
        (tensors / name / "f").write_bytes(b"x")
    (tensors / "20240101-000000-cafef00d").write_bytes(b"a file, not a run folder")

    Store(tmp_path)
    left = sorted(p.name for p in tensors.iterdir())
    assert left == sorted([kept, live, f".staging-{live}", remote, f".staging-{remote}",
                           "notes", ".staging-notes", "20240101-000000-cafef00d"])
    assert store.get_run(failed).status == "failed"
    _assert_kept_run_intact(store, kept)
