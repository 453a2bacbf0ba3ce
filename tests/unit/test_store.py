"""The run store: transactional runs, failure handling, concurrent writers."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.errors import InputError, StoreError
from mechscope.store import Store


def test_complete_run_round_trip(tmp_path, tiny):
    store = Store(tmp_path)
    with store.run("unit", config={"a": 1}, model=tiny, seed=7) as run:
        run.add_table("rows", [{"x": 1, "y": 0.5}, {"x": 2, "y": float("nan")}])
        run.add_table("cols", {"layer": [0, 1], "score": [0.1, 0.2]})
        run.add_json("summary", {"n": 2, "t": torch.tensor([1.0, 2.0])})
        run.add_tensors("acts", {"z": torch.arange(6.0).reshape(2, 3)})
        run.time("work", 0.25)
    rec = store.get_run(run.id)
    assert rec.status == "complete" and rec.seed == 7 and rec.config == {"a": 1}
    assert rec.model_spec.startswith("native:") and len(rec.model_fingerprint) == 16
    assert rec.versions["torch"] and rec.timings["work"] == 0.25 and "total" in rec.timings
    assert store.table(run.id, "rows")["x"].tolist() == [1, 2]
    assert store.table(run.id, "cols")["score"].tolist() == [0.1, 0.2]
    assert store.json(run.id, "summary") == {"n": 2, "t": [1.0, 2.0]}
    torch.testing.assert_close(store.tensors(run.id, "acts")["z"], torch.arange(6.0).reshape(2, 3))
    assert store.result_names(run.id) == {"acts": "tensors", "cols": "table", "rows": "table",
                                          "summary": "json"}
    assert store.get_run(run.id[:20]).id == run.id  # unique prefix
    assert store.latest("unit").id == run.id


@pytest.mark.parametrize("exc", [RuntimeError("crash"), KeyboardInterrupt()])
def test_failed_run_shows_no_half_result(tmp_path, exc):
    store = Store(tmp_path)
    with pytest.raises(type(exc)), store.run("unit") as run:
        run.add_table("rows", [{"x": 1}])
        run.add_tensors("acts", {"z": torch.ones(3)})
        raise exc
    rec = store.get_run(run.id)
    assert rec.status == "failed" and type(exc).__name__ in rec.error
    with pytest.raises(StoreError, match="failed"):
        store.table(run.id, "rows")
    assert not (tmp_path / "tensors" / run.id).exists()
    assert not list((tmp_path / "tensors").glob(".staging-*"))
    con = sqlite3.connect(tmp_path / "store.db")
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0


def test_killed_process_run_is_marked_failed(tmp_path):
    store = Store(tmp_path)
    writer = store.run("unit")
    writer.__enter__()
    writer.add_tensors("acts", {"z": torch.ones(2)})
    con = sqlite3.connect(tmp_path / "store.db")
    with con:  # pretend the writing process is gone
        con.execute("UPDATE runs SET pid = ? WHERE id = ?", (2**22 + 12345, writer.id))
    reopened = Store(tmp_path)
    rec = reopened.get_run(writer.id)
    assert rec.status == "failed" and "died" in rec.error
    assert not list((tmp_path / "tensors").glob(".staging-*"))


def test_bad_names_and_lookups(tmp_path):
    store = Store(tmp_path)
    with store.run("unit") as run:
        run.add_json("a", 1)
        with pytest.raises(InputError, match="already"):
            run.add_json("a", 2)
        with pytest.raises(InputError, match="without '/'"):
            run.add_json("x/y", 2)
        with pytest.raises(InputError, match="different lengths"):
            run.add_table("t", {"a": [1, 2], "b": [1]})
    with pytest.raises(StoreError, match="no table result 'nope'"):
        store.table(run.id, "nope")
    with pytest.raises(StoreError, match="not found"):
        store.get_run("zzz")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        Store(tmp_path / "file")


def test_delete_run(tmp_path):
    store = Store(tmp_path)
    with store.run("unit") as run:
        run.add_tensors("acts", {"z": torch.ones(2)})
    store.delete_run(run.id)
    assert store.runs() == [] and not (tmp_path / "tensors" / run.id).exists()


def _writer(root: str, tag: int, n: int) -> None:
    store = Store(root)
    for i in range(n):
        with store.run("concurrent", config={"tag": tag, "i": i}) as run:
            run.add_table("rows", [{"tag": tag, "i": i}])
            run.add_tensors("acts", {"v": torch.full((8,), float(tag * 100 + i))})
            time.sleep(0.005)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    Store(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), tag, 12)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    store = Store(tmp_path)
    runs = store.runs(kind="concurrent")
    assert len(runs) == 24 and {r.status for r in runs} == {"complete"}
    seen = set()
    for r in runs:
        tag, i = r.config["tag"], r.config["i"]
        assert store.table(r.id, "rows").to_dict("records") == [{"tag": tag, "i": i}]
        assert float(store.tensors(r.id, "acts")["v"][0]) == tag * 100 + i
        seen.add((tag, i))
    assert len(seen) == 24


# -- JSON results: numpy/torch values, and never invalid JSON ---------------------------------------


def _strict_json(text: str):
    """Parse ``text`` as standard JSON: ``NaN``/``Infinity`` are not JSON and fail here."""

    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _assert_database_is_strict_json(root: Path) -> None:
    con = sqlite3.connect(root / "store.db")
    try:
        for (payload,) in con.execute("SELECT payload FROM results"):
            _strict_json(payload)
        for row in con.execute("SELECT config, versions, timings FROM runs"):
            for text in row:
                _strict_json(text)
    finally:
        con.close()


@dataclasses.dataclass
class _Point:
    x: object
    where: object


def test_add_json_accepts_numpy_torch_dataclasses_and_paths(tmp_path):
    value = {
        "array": np.arange(3, dtype=np.int32),
        "matrix": np.array([[0.5, 1.5], [2.5, 3.5]], dtype=np.float32),
        "f32": np.float32(0.25), "i64": np.int64(-7), "flag": np.bool_(True),
        "scalar": torch.tensor(2.5), "ints": torch.tensor([[1, 2]]),
        "bf16": torch.tensor([1.0, 0.5], dtype=torch.bfloat16),
        "point": _Point(x=np.float64(1.5), where=Path("/a/b")),
        "pair": (1, np.int16(2)), "nested": [{"k": np.array([0.125])}],
        np.int64(3): "numpy key", 4: "int key",
    }
    store = Store(tmp_path)
    with store.run("unit") as run:
        run.add_json("mixed", value)
        run.add_json("bare", np.float64(0.5))
    got = store.json(run.id, "mixed")
    assert got == {
        "array": [0, 1, 2], "matrix": [[0.5, 1.5], [2.5, 3.5]], "f32": 0.25, "i64": -7,
        "flag": True, "scalar": 2.5, "ints": [[1, 2]], "bf16": [1.0, 0.5],
        "point": {"x": 1.5, "where": "/a/b"}, "pair": [1, 2], "nested": [{"k": [0.125]}],
        "3": "numpy key", "4": "int key",
    }
    assert type(got["flag"]) is bool and type(got["i64"]) is int
    assert store.json(run.id, "bare") == 0.5
    _assert_database_is_strict_json(tmp_path)


@pytest.mark.parametrize(("value", "bad", "path"), [
    ({"scores": [0.0, 1.0, 2.0, float("nan")]}, "NaN", "['scores'][3]"),
    ({"scores": np.array([[1.0, 2.0], [3.0, np.inf]])}, "inf", "['scores'][1][1]"),
    ([{"t": torch.tensor([0.0, -float("inf")])}], "-inf", "[0]['t'][1]"),
    ({"p": _Point(x=np.float32("nan"), where=None)}, "NaN", "['p']['x']"),
    ({"k": (1, {2: float("inf")})}, "inf", "['k'][1]['2']"),
    (np.float32("nan"), "NaN", "the top level"),
    (torch.tensor([1.0, float("nan")], dtype=torch.float16), "NaN", "[1]"),
])
def test_non_finite_json_is_refused_naming_result_and_path(tmp_path, value, bad, path):
    store = Store(tmp_path)
    with store.run("unit") as run:
        run.add_json("ok", [1.0])
        with pytest.raises(InputError) as info:
            run.add_json("summary", value)
    assert str(info.value) == (f"result 'summary' has {bad} at {path}; "
                               "replace it with None or a finite number")
    # The run still completes with its good result, and no invalid JSON reached the database.
    assert store.result_names(run.id) == {"ok": "json"}
    _assert_database_is_strict_json(tmp_path)


def test_tables_store_nan_as_none_and_refuse_inf(tmp_path):
    store = Store(tmp_path)
    with store.run("unit") as run:
        run.add_table("rows", [{"x": float("nan"), "y": np.float32("nan"), "z": torch.tensor(1.5)},
                               {"x": 1.0, "y": np.float64(2.0), "z": torch.tensor(float("nan"))}])
        run.add_table("cols", {"a": np.array([1.0, np.nan]), "b": torch.tensor([3, 4])})
        with pytest.raises(InputError, match=r"^table 'bad' has inf at \[1\]\['y'\]; replace it"):
            run.add_table("bad", [{"y": 0.0}, {"y": float("inf")}])
        with pytest.raises(InputError, match=r"table 'bad2' has -inf at \[0\]\['a'\]"):
            run.add_table("bad2", {"a": np.array([-np.inf])})
    assert store.table(run.id, "rows").to_dict("records")[0]["z"] == 1.5
    con = sqlite3.connect(tmp_path / "store.db")  # stored as plain JSON, None for NaN
    payloads = dict(con.execute("SELECT name, payload FROM results").fetchall())
    con.close()
    assert _strict_json(payloads["rows"])["records"] == [{"x": None, "y": None, "z": 1.5},
                                                         {"x": 1.0, "y": 2.0, "z": None}]
    assert _strict_json(payloads["cols"])["records"] == [{"a": 1.0, "b": 3}, {"a": None, "b": 4}]
    assert set(payloads) == {"rows", "cols"}
    _assert_database_is_strict_json(tmp_path)


def test_non_finite_config_and_timings_are_refused(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(InputError, match=r"the run config has NaN at \['lr'\]"):
        store.run("unit", config={"lr": float("nan")})
    assert store.runs() == []  # refused before any row was written
    with (store.run("unit", config={"lr": np.float32(0.5), "layers": np.arange(2)}) as run,
          pytest.raises(InputError, match="timing 'step' is inf")):
        run.time("step", float("inf"))
    rec = store.get_run(run.id)
    assert rec.config == {"lr": 0.5, "layers": [0, 1]} and "step" not in rec.timings
    _assert_database_is_strict_json(tmp_path)


# -- read-only stores -------------------------------------------------------------------------------


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.stat()
        out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


def _same_files(after: dict, before: dict) -> bool:
    """The listings match, except for SQLite's -wal/-shm companions that a query on a writable
    folder may create (and the folder's own mtime, which their creation changes)."""
    extra = set(after) - set(before)
    if not extra <= {"store.db-wal", "store.db-shm"}:
        return False
    return all(after[k] == v for k, v in before.items() if k != ".") and set(before) <= set(after)


def _filled_store(root: Path) -> tuple[Store, str]:
    store = Store(root)
    with store.run("unit", config={"a": 1}) as run:
        run.add_table("rows", [{"x": 1}, {"x": 2}])
        run.add_json("summary", {"n": 2})
        run.add_tensors("acts", {"z": torch.arange(4.0)})
    return store, run.id


def _read_everything(store: Store, run_id: str) -> dict:
    return {"runs": [r.id for r in store.runs()], "status": store.get_run(run_id).status,
            "rows": store.table(run_id, "rows").to_dict("records"),
            "summary": store.json(run_id, "summary"), "names": store.result_names(run_id)}


def test_readonly_open_creates_nothing_and_reads_everything(tmp_path):
    _, run_id = _filled_store(tmp_path)
    before = _listing(tmp_path)
    assert "store.db-wal" not in before  # every writer connection is closed
    reader = Store(tmp_path, readonly=True)
    assert _listing(tmp_path) == before  # opening created, changed and touched nothing
    db_bytes = (tmp_path / "store.db").read_bytes()
    assert _read_everything(reader, run_id) == {
        "runs": [run_id], "status": "complete", "rows": [{"x": 1}, {"x": 2}],
        "summary": {"n": 2}, "names": {"acts": "tensors", "rows": "table", "summary": "json"}}
    torch.testing.assert_close(reader.tensors(run_id, "acts")["z"], torch.arange(4.0))
    # Reading never changes the database; at most SQLite's own -wal/-shm companions appear.
    assert (tmp_path / "store.db").read_bytes() == db_bytes
    assert _same_files(_listing(tmp_path), before)


def test_readonly_open_with_a_live_writer_sees_its_commits_and_creates_nothing(tmp_path):
    writer, _ = _filled_store(tmp_path)
    keep = sqlite3.connect(tmp_path / "store.db")  # a live connection: commits stay in the WAL
    try:
        keep.execute("SELECT count(*) FROM runs").fetchall()
        with writer.run("unit") as run:
            run.add_json("late", [3])
        assert (tmp_path / "store.db-wal").stat().st_size > 0
        before = _listing(tmp_path)
        reader = Store(tmp_path, readonly=True)
        assert reader.json(run.id, "late") == [3]
        assert set(_listing(tmp_path)) == set(before)
    finally:
        keep.close()


def test_readonly_store_refuses_writes_and_does_not_reap(tmp_path):
    store, run_id = _filled_store(tmp_path)
    writer = store.run("unit")
    writer.__enter__()
    writer.add_tensors("acts", {"z": torch.ones(2)})
    con = sqlite3.connect(tmp_path / "store.db")
    with con:  # the writing process is gone
        con.execute("UPDATE runs SET pid = ? WHERE id = ?", (2**22 + 12345, writer.id))
    con.close()
    before = _listing(tmp_path)
    reader = Store(tmp_path, readonly=True)
    with pytest.raises(StoreError, match=r"opened read-only \(readonly=True\); open it with Store"):
        reader.run("unit")
    with pytest.raises(StoreError, match="opened read-only"):
        reader.delete_run(run_id)
    assert reader.get_run(writer.id).status == "running"  # a reader reaps nothing
    assert [r.id for r in reader.runs()] == [run_id, writer.id]
    assert _same_files(_listing(tmp_path), before)  # ... and deletes no staging folder


def test_readonly_open_of_a_non_store_is_an_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(StoreError, match=r"is not a mechscope store \(no store.db\); create one"):
        Store(missing, readonly=True)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="is not a mechscope store"):
        Store(empty, readonly=True)
    assert list(empty.iterdir()) == []


def test_readonly_falls_back_to_immutable_when_sqlite_cannot_create_its_files(tmp_path, monkeypatch):
    """What a read-only file system does to ``mode=ro``, simulated: SQLite cannot create -shm."""
    _, run_id = _filled_store(tmp_path)
    real_connect = sqlite3.connect
    uris = []

    def connect(database, *args, **kwargs):
        uris.append(str(database))
        if kwargs.get("uri") and "immutable=1" not in str(database):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    before = _listing(tmp_path)
    reader = Store(tmp_path, readonly=True)
    assert _read_everything(reader, run_id)["summary"] == {"n": 2}
    assert _listing(tmp_path) == before
    assert uris and all("mode=ro" in u for u in uris)
    assert any("immutable=1" in u for u in uris)
    # With a -wal file present, immutable would miss committed runs: an error, not stale data.
    (tmp_path / "store.db-wal").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot read the store"):
        reader.runs()


def _as_unprivileged(fn):
    """Run ``fn()`` as user ``nobody`` in a forked child when we are root (root ignores permission
    bits, so only this shows what a normal user sees); in-process otherwise. Returns its result."""
    if os.geteuid() != 0:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no torch work here, only SQLite and the file system
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = {"ok": fn()}
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            os.write(write_end, json.dumps(out, default=str).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "error" not in out, out["error"]
    return out["ok"]


_HOLD_OPEN = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("SELECT count(*) FROM runs").fetchall()
print("open", flush=True)
sys.stdin.read()
con.close()
"""


@pytest.mark.parametrize("live_writer", [False, True])
def test_store_in_a_folder_the_user_cannot_write(live_writer):
    """A store folder (and files) without write permission, seen by a non-root user: a reader
    reads it, creating nothing; a writer gets one clear StoreError. With ``live_writer`` another
    user's connection holds the WAL open, so the newest run exists only in the -wal file."""
    base = Path(tempfile.mkdtemp(prefix="mechscope-ro-"))
    os.chmod(base, 0o755)  # reachable by the unprivileged user
    root = base / "store"
    keep = None
    try:
        writer, run_id = _filled_store(root)
        if live_writer:
            # Another process: a connection in this one would be inherited by the forked child,
            # which must not share SQLite state with us (SQLite connections do not survive fork).
            keep = subprocess.Popen(
                [sys.executable, "-c", _HOLD_OPEN, str(root / "store.db")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert keep.stdout is not None and keep.stdout.readline().strip() == "open"
            with writer.run("unit") as late:
                late.add_json("late", [3])
            run_id = late.id
        for path in [*root.rglob("*"), root]:
            path.chmod(0o555 if path.is_dir() else 0o444)

        def observe():
            before = _listing(root)
            out = {}
            reader = Store(root, readonly=True)
            out["runs"] = [r.id for r in reader.runs()]
            out["names"] = reader.result_names(run_id)
            out["unchanged"] = _listing(root) == before
            for target in (root, root / "new"):
                try:
                    Store(target)
                    out[target.name] = "opened"
                except StoreError as exc:
                    out[target.name] = str(exc)
            out["new_exists"] = (root / "new").exists()
            return out

        out = _as_unprivileged(observe)
        assert run_id in out["runs"]
        assert out["names"] == ({"late": "json"} if live_writer else
                                {"acts": "tensors", "rows": "table", "summary": "json"})
        assert out["unchanged"] and not out["new_exists"]
        for name in ("store", "new"):
            assert out[name].startswith(f"cannot write to the store at {root}"), out[name]
            assert out[name].endswith("choose a writable --store folder or open it with "
                                      "readonly=True")
            assert "\n" not in out[name]
    finally:
        if keep is not None:
            keep.communicate("", timeout=60)
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(base)


def test_writer_open_errors_are_one_clear_store_error(tmp_path, monkeypatch):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "store.db").write_bytes(b"this is not a database" * 100)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="is not a SQLite database"):
            Store(bogus, readonly=readonly)
    other = tmp_path / "other"
    other.mkdir()
    con = sqlite3.connect(other / "store.db")
    con.execute("CREATE TABLE photos (id INTEGER)")
    con.commit()
    con.close()
    for readonly in (True, False):
        with pytest.raises(StoreError, match=r"not a mechscope store \(its database has no runs"):
            Store(other, readonly=readonly)
    con = sqlite3.connect(other / "store.db")
    assert {r[0] for r in con.execute("SELECT name FROM sqlite_master")} == {"photos"}
    con.close()

    # What SQLite says on a read-only medium, simulated (root could write anyway).
    def refuse(*args, **kwargs):
        exc = sqlite3.OperationalError("attempt to write a readonly database")
        exc.sqlite_errorname = "SQLITE_READONLY"
        raise exc

    monkeypatch.setattr(sqlite3, "connect", refuse)
    with pytest.raises(StoreError) as info:
        Store(tmp_path / "fresh")
    assert str(info.value) == (
        f"cannot write to the store at {tmp_path / 'fresh'}: attempt to write a readonly database; "
        "choose a writable --store folder or open it with readonly=True")
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "tensors")
    with pytest.raises(StoreError, match=r"cannot write to the store at .*: the folder .*tensors "
                                         r"is read-only; choose a writable --store folder"):
        Store(tmp_path / "fresh")


# -- schema version ---------------------------------------------------------------------------------

_OLD_SCHEMA = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
    created REAL NOT NULL, finished REAL, config TEXT NOT NULL, model_spec TEXT,
    model_fingerprint TEXT, versions TEXT NOT NULL, seed INTEGER,
    timings TEXT NOT NULL DEFAULT '{}', error TEXT, host TEXT NOT NULL, pid INTEGER NOT NULL
);
CREATE TABLE results (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE, name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('table', 'json', 'tensors')), payload TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX runs_created ON runs(created);
"""


def _user_version(root: Path) -> int:
    con = sqlite3.connect(root / "store.db")
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def test_new_store_records_schema_version_1(tmp_path):
    Store(tmp_path)
    assert _user_version(tmp_path) == 1


def test_store_from_before_schema_versions_is_read_and_upgraded(tmp_path):
    """A store as the first mechscope wrote it: no recorded version, same tables."""
    from safetensors.torch import save_file

    con = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(_OLD_SCHEMA)
    run_id = "20240101-000000-0123abcd"
    con.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, "old", "complete", 1.0, 2.0, '{"a": 1}', None, None,
                 '{"torch": "2"}', 3, '{"total": 1.0}', None, "somehost", 1))
    con.execute("INSERT INTO results VALUES (?,?,?,?)", (run_id, "s", "json", '{"v": NaN}'))
    con.execute("INSERT INTO results VALUES (?,?,?,?)",
                (run_id, "acts", "tensors", f'{{"file": "tensors/{run_id}/acts.safetensors"}}'))
    con.close()
    (tmp_path / "tensors" / run_id).mkdir(parents=True)
    save_file({"z": torch.ones(3)}, str(tmp_path / "tensors" / run_id / "acts.safetensors"))

    reader = Store(tmp_path, readonly=True)
    assert reader.get_run(run_id).config == {"a": 1}
    assert _user_version(tmp_path) == 0  # a reader accepts it as it is

    writer = Store(tmp_path)
    assert _user_version(tmp_path) == 1
    assert writer.get_run(run_id).status == "complete"
    value = writer.json(run_id, "s")["v"]  # NaN written by the old code still reads
    assert value != value
    torch.testing.assert_close(writer.tensors(run_id, "acts")["z"], torch.ones(3))
    with writer.run("new") as run:
        run.add_json("x", 1)
    assert writer.json(run.id, "x") == 1


def test_newer_schema_version_is_refused(tmp_path):
    Store(tmp_path)
    con = sqlite3.connect(tmp_path / "store.db")
    con.execute("PRAGMA user_version = 7")
    con.commit()
    con.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"^store .* has schema version 7; this mechscope "
                                             r"understands up to 1; upgrade mechscope"):
            Store(tmp_path, readonly=readonly)
    assert _user_version(tmp_path) == 7


# -- file modes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_created_files_and_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        root = tmp_path / "store"
        store = Store(root)
        with store.run("unit") as run:
            run.add_table("rows", [{"x": 1}])
            run.add_tensors("acts", {"z": torch.ones(2)})
            run.add_tensors("more", {"z": torch.ones(2)})
        keep = sqlite3.connect(root / "store.db")  # keeps -wal and -shm in place to check them
        keep.execute("SELECT count(*) FROM runs").fetchall()
        with store.run("unit") as run2:
            run2.add_json("x", 1)
        modes = {str(p.relative_to(root)): p.lstat().st_mode for p in [root, *root.rglob("*")]}
        keep.close()
    finally:
        os.umask(old)
    assert {".", "tensors", "store.db", "store.db-wal", "store.db-shm", f"tensors/{run.id}",
            f"tensors/{run.id}/acts.safetensors", f"tensors/{run.id}/more.safetensors"} <= set(modes)
    for name, mode in modes.items():
        want = (0o777 if stat.S_ISDIR(mode) else 0o666) & ~umask
        assert stat.S_IMODE(mode) == want, (name, oct(stat.S_IMODE(mode)), oct(umask))
