"""SQLite + safetensors implementation of the run store (see :mod:`mechscope.store`)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import StoreError
from mechscope.store.writer import RunWriter
from mechscope.types import Model

SCHEMA_VERSION = 1
"""The store schema version this mechscope writes and understands (SQLite ``PRAGMA user_version``).

Version 1 is the schema below; stores made before versions were recorded (``user_version`` 0 with
a ``runs`` table) have the same tables and are marked version 1 by the first writer that opens
them. A store with a higher version was made by a newer mechscope and is refused.
"""

_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
    created REAL NOT NULL,
    finished REAL,
    config TEXT NOT NULL,
    model_spec TEXT,
    model_fingerprint TEXT,
    versions TEXT NOT NULL,
    seed INTEGER,
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('table', 'json', 'tensors')),
    payload TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
"""


@dataclass(frozen=True)
class RunRecord:
    """One row of the ``runs`` table."""

    id: str
    kind: str
    status: str
    created: float
    finished: float | None
    config: dict[str, Any]
    model_spec: str | None
    model_fingerprint: str | None
    versions: dict[str, str]
    seed: int | None
    timings: dict[str, float]
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Store:
    """A run store rooted at a directory.

    A writer (the default) creates the directory, its ``tensors/`` folder and ``store.db`` if they
    are missing, records the schema version, and tidies up after crashed runs: ``running`` runs
    whose process on this host is gone are marked ``failed``, and tensor folders that belong to no
    complete or live run (``tensors/<run_id>`` left by a crash between moving the files into place
    and committing, ``tensors/.staging-<run_id>`` left by a killed process) are deleted. Files and
    folders are created with the modes the user's umask allows.

    A reader (``readonly=True``: dashboards, reports, ``mechscope runs``) changes nothing: opening
    creates no file or folder, writes no schema and reaps no runs; :meth:`run` and
    :meth:`delete_run` raise :class:`StoreError`. SQLite is opened with ``mode=ro``; where its
    ``-wal``/``-shm`` companions do not exist and cannot be created (a read-only folder or file
    system, whose store nobody can be writing to), it falls back to ``immutable=1``. Opening
    itself never makes SQLite create them, but a query on a writable folder lets SQLite create
    them when they are missing, as it needs them to read consistently while a writer may start.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> with Store(root).run("example") as run:
    ...     run.add_json("answer", 42)
    >>> reader = Store(root, readonly=True)
    >>> reader.json(run.id, "answer")
    42
    >>> reader.run("example")
    Traceback (most recent call last):
    ...
    mechscope.errors.StoreError: the store at ... was opened read-only (readonly=True); ...

    Args:
        root: The store directory (``~`` is expanded).
        readonly: Open for reading only (see above).

    Raises:
        StoreError: ``root`` is a file; a reader's ``root`` is not a store (no ``store.db``); a
            writer cannot write there; ``store.db`` is not a mechscope database or has a newer
            schema version than this mechscope understands.
    """

    def __init__(self, root: str | Path, *, readonly: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.readonly = readonly
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file; a store is a directory")
        self.db_path = self.root / "store.db"
        if readonly:
            self._open_reader()
        else:
            self._open_writer()

    # -- opening -----------------------------------------------------------------------------
    def _open_reader(self) -> None:
        if not self.db_path.is_file():
            raise StoreError(
                f"{self.root} is not a mechscope store (no store.db); create one with "
                f"Store({str(self.root)!r}) or `mechscope demo --store {self.root}`, or point at "
                "an existing store folder"
            )
        try:
            # No -wal file: nothing is writing and the database file is complete, so read it as
            # immutable and let SQLite create nothing. With one: mode=ro, which creates nothing.
            con = self._connect_ro(immutable=not self._wal_path.exists())
            try:
                version, tables = _inspect(con)
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        self._check_schema(version, tables)

    def _open_writer(self) -> None:
        tensors = self.root / "tensors"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tensors.mkdir(exist_ok=True)
        except OSError as exc:
            where = exc.filename or self.root
            raise self._unwritable(f"cannot create {where} ({exc.strerror or exc})") from exc
        for folder in (self.root, tensors):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise self._unwritable(f"the folder {folder} is read-only")
        if self.db_path.exists() and not os.access(self.db_path, os.R_OK | os.W_OK):
            raise self._unwritable(f"{self.db_path} is read-only")
        try:
            # Created here, not by SQLite (which would use 0644): the umask decides the mode, and
            # SQLite gives -wal and -shm the database file's mode.
            os.close(os.open(self.db_path, os.O_CREAT | os.O_WRONLY, 0o666))
        except OSError as exc:
            raise self._unwritable(f"cannot open {self.db_path} ({exc.strerror or exc})") from exc
        try:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                version, tables = _inspect(con)
                self._check_schema(version, tables, fresh_ok=True)  # closing rolls back
                if version < SCHEMA_VERSION:  # a new store, or one from before versions
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            con.execute(statement)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute("COMMIT")
            finally:
                con.close()
            self._reap_dead_runs()
            self._remove_orphans()
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc

    def _check_schema(self, version: int, tables: set[str], *, fresh_ok: bool = False) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.root} has schema version {version}; this mechscope understands up "
                f"to {SCHEMA_VERSION}; upgrade mechscope (pip install -U mechscope)"
            )
        if "runs" not in tables and not (fresh_ok and not tables):
            what = f"its database has no runs table (tables: {sorted(tables)})" if tables else \
                "its database is empty"
            raise StoreError(f"{self.root} is not a mechscope store ({what}); point at a mechscope "
                             "store folder, or at a new folder to create one")

    def _unwritable(self, reason: str) -> StoreError:
        return StoreError(f"cannot write to the store at {self.root}: {reason}; choose a writable "
                          "--store folder or open it with readonly=True")

    def _open_error(self, exc: sqlite3.Error) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "")
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if name == "SQLITE_NOTADB":
            return StoreError(f"{self.root} is not a mechscope store: {self.db_path} is not a "
                              f"SQLite database ({reason}); point at a mechscope store folder")
        if not self.readonly and name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN",
                                                  "SQLITE_PERM", "SQLITE_AUTH")):
            return self._unwritable(reason)
        action = "read" if self.readonly else "open"
        return StoreError(f"cannot {action} the store at {self.root}: {reason} (SQLite "
                          f"{name or 'error'}); check that {self.db_path} is a readable, "
                          "undamaged mechscope store")

    # -- connections -------------------------------------------------------------------------
    @property
    def _wal_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + "-wal")

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            return self._connect_reader()
        con = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    def _connect_ro(self, *, immutable: bool) -> sqlite3.Connection:
        """A connection that cannot write; raises ``sqlite3.Error`` if SQLite cannot read."""
        uri = self.db_path.absolute().as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")
        con = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
        try:
            con.execute("PRAGMA query_only=ON")
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the WAL now
        except BaseException:
            con.close()
            raise
        return con

    def _connect_reader(self) -> sqlite3.Connection:
        try:
            return self._connect_ro(immutable=False)
        except sqlite3.OperationalError as exc:
            # SQLite could not open or create the -wal/-shm files (read-only folder or file
            # system). Without a -wal file nothing is writing and the database file is complete,
            # so read it as immutable; with one, immutable would miss committed runs.
            if self._wal_path.exists():
                raise StoreError(
                    f"cannot read the store at {self.root}: {exc}; a writer's {self._wal_path.name}"
                    " is there, and SQLite needs to read it and to read or create store.db-shm; "
                    "make them readable, or read a copy of the store folder") from exc
            try:
                return self._connect_ro(immutable=True)
            except sqlite3.Error as again:
                raise self._open_error(again) from again

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def _reap_dead_runs(self) -> None:
        """Mark ``running`` runs of dead processes on this host as failed."""
        host = socket.gethostname()
        with self._transaction() as con:
            rows = con.execute(
                "SELECT id, pid FROM runs WHERE status = 'running' AND host = ?", (host,)
            ).fetchall()
            for run_id, pid in rows:
                if not _pid_alive(int(pid)):
                    con.execute(
                        "UPDATE runs SET status='failed', finished=?, error=? WHERE id=?",
                        (time.time(), "the process died before the run finished", run_id),
                    )

    def _remove_orphans(self) -> None:
        """Delete tensor folders that no complete or live run owns (after :meth:`_reap_dead_runs`).

        ``tensors/<run_id>`` goes unless its run is ``complete`` or ``running`` (a writer between
        moving its files into place and committing); ``tensors/.staging-<run_id>`` goes unless its
        run is ``running``. ``running`` runs here are alive or on another host: dead ones on this
        host were just reaped. Only folders named like run ids are touched.
        """
        folder = self.root / "tensors"
        try:
            # Listed before the statuses are read: a folder is made after its run's row, so every
            # folder listed here has its row in the snapshot below.
            entries = [e for e in folder.iterdir() if e.is_dir() and not e.is_symlink()]
        except OSError:
            return
        candidates = []
        for entry in entries:
            staging = entry.name.startswith(".staging-")
            run_id = entry.name.removeprefix(".staging-")
            if _RUN_ID.fullmatch(run_id):
                candidates.append((entry, run_id, staging))
        if not candidates:
            return
        con = self._connect()
        try:
            status = dict(con.execute("SELECT id, status FROM runs").fetchall())
        finally:
            con.close()
        for entry, run_id, staging in candidates:
            keep = {"running"} if staging else {"running", "complete"}
            if status.get(run_id) not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def _require_writable(self, action: str) -> None:
        if self.readonly:
            raise StoreError(f"the store at {self.root} was opened read-only (readonly=True); "
                             f"open it with Store({str(self.root)!r}) to {action}")

    # -- writing -----------------------------------------------------------------------------
    def run(self, kind: str, *, config: Mapping[str, Any] | Any = None, model: Model | None = None,
            model_spec: str | None = None, seed: int | None = None,
            model_fingerprint: str | None = None) -> RunWriter:
        """Start a run; use it as a context manager (see :class:`RunWriter`).

        The model's spec and fingerprint are recorded from ``model``, or given directly
        (``model_spec``, ``model_fingerprint``) for results computed earlier.

        Raises:
            StoreError: the store was opened with ``readonly=True``.
            InputError: ``config`` holds a NaN or infinite value.
        """
        return RunWriter(self, kind, config=config, model=model, model_spec=model_spec, seed=seed,
                         model_fingerprint=model_fingerprint)

    # -- reading -----------------------------------------------------------------------------
    def runs(self, *, status: str | None = None, kind: str | None = None) -> list[RunRecord]:
        """Runs, oldest first, optionally filtered."""
        query, args = "SELECT * FROM runs WHERE 1=1", []
        if status is not None:
            query += " AND status = ?"
            args.append(status)
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        con = self._connect()
        try:
            con.row_factory = sqlite3.Row
            rows = con.execute(query + " ORDER BY created, id", args).fetchall()
        finally:
            con.close()
        return [_record(r) for r in rows]

    def _maybe_run(self, run_id: str) -> RunRecord | None:
        con = self._connect()
        try:
            con.row_factory = sqlite3.Row
            row = con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        finally:
            con.close()
        return None if row is None else _record(row)

    def get_run(self, run_id: str) -> RunRecord:
        """The run ``run_id`` (a unique prefix is enough)."""
        rec = self._maybe_run(run_id)
        if rec is None:
            matches = [r for r in self.runs() if r.id.startswith(run_id)]
            if len(matches) == 1:
                return matches[0]
            hint = "it is ambiguous" if matches else "no run has that id"
            raise StoreError(f"run {run_id!r} not found in {self.root} ({hint}); "
                             f"`mechscope runs --store {shlex.quote(str(self.root))}` lists them")
        return rec

    def latest(self, kind: str | None = None) -> RunRecord:
        """The newest complete run (of ``kind``)."""
        runs = self.runs(status="complete", kind=kind)
        if not runs:
            raise StoreError(f"no complete run{f' of kind {kind!r}' if kind else ''} in {self.root}")
        return runs[-1]

    def result_names(self, run_id: str) -> dict[str, str]:
        """``name -> kind`` of a complete run's results."""
        rec = self.get_run(run_id)
        con = self._connect()
        try:
            rows = con.execute(
                "SELECT name, kind FROM results WHERE run_id = ? ORDER BY name", (rec.id,)
            ).fetchall()
        finally:
            con.close()
        return dict(rows)

    def _payload(self, run_id: str, name: str, kind: str) -> Any:
        rec = self.get_run(run_id)
        if rec.status != "complete":
            raise StoreError(f"run {rec.id} is {rec.status}; only complete runs have results")
        con = self._connect()
        try:
            row = con.execute(
                "SELECT kind, payload FROM results WHERE run_id = ? AND name = ?", (rec.id, name)
            ).fetchone()
        finally:
            con.close()
        if row is None or row[0] != kind:
            have = self.result_names(rec.id)
            raise StoreError(f"run {rec.id} has no {kind} result {name!r}; it has {have}")
        return json.loads(row[1])

    def table(self, run_id: str, name: str) -> Any:
        """A table result as a pandas DataFrame."""
        import pandas as pd

        payload = self._payload(run_id, name, "table")
        return pd.DataFrame.from_records(payload["records"], columns=payload["columns"])

    def json(self, run_id: str, name: str) -> Any:
        """A JSON result."""
        return self._payload(run_id, name, "json")

    def tensors(self, run_id: str, name: str) -> dict[str, torch.Tensor]:
        """A tensors result (a dict of named tensors)."""
        from safetensors.torch import load_file

        payload = self._payload(run_id, name, "tensors")
        path = self.root / payload["file"]
        if not path.is_file():
            raise StoreError(f"tensor file {path} of run {run_id} is missing")
        return load_file(str(path))

    def delete_run(self, run_id: str) -> None:
        """Delete a run, its results and its tensor files.

        Raises:
            StoreError: the run does not exist, or the store was opened with ``readonly=True``.
        """
        self._require_writable("delete runs")
        rec = self.get_run(run_id)
        with self._transaction() as con:
            con.execute("DELETE FROM results WHERE run_id = ?", (rec.id,))
            con.execute("DELETE FROM runs WHERE id = ?", (rec.id,))
        shutil.rmtree(self.root / "tensors" / rec.id, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inspect(con: sqlite3.Connection) -> tuple[int, set[str]]:
    """The schema version and table names of a database."""
    version = int(con.execute("PRAGMA user_version").fetchone()[0])
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return version, tables


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"], kind=row["kind"], status=row["status"], created=row["created"],
        finished=row["finished"], config=json.loads(row["config"]),
        model_spec=row["model_spec"], model_fingerprint=row["model_fingerprint"],
        versions=json.loads(row["versions"]), seed=row["seed"],
        timings=json.loads(row["timings"]), error=row["error"],
    )
