"""SQLite + safetensors implementation of the run store (see :mod:`mechscope.store`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch

from mechscope.errors import InputError, StoreError

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


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("mechscope", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


_FIX = "replace it with None or a finite number"


def _bad_float(value: float, where: str, path: str, nan_to_none: bool) -> None:
    """``None`` for a NaN that may become ``None``; raise :class:`InputError` otherwise."""
    if math.isnan(value) and nan_to_none:
        return None
    bad = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    raise InputError(f"{where} has {bad} at {path or 'the top level'}; {_FIX}")


def _json_key(key: Any, where: str, path: str) -> str:
    """A mapping key as JSON writes it (``json.dumps`` turns ``1`` into ``"1"``, ...)."""
    if isinstance(key, str):
        return key
    plain = _jsonable(key, where, path)
    if isinstance(plain, str):
        return plain
    if plain is None or isinstance(plain, bool | int | float):
        return json.dumps(plain)
    return str(plain)


def _jsonable(value: Any, where: str, path: str = "", *, nan_to_none: bool = False) -> Any:
    """``value`` as plain JSON data (dict/list/str/int/float/bool/None), checked to be finite.

    Converts numpy arrays and scalars, torch tensors, dataclass instances, paths, tuples and sets
    (recursively); anything else becomes ``str(value)``. A NaN or +-inf anywhere raises
    :class:`InputError` naming ``where`` and the path of the value (``['scores'][3]``), except that
    with ``nan_to_none`` a NaN becomes ``None`` (tables: NaN is a missing cell; inf stays an
    error). pandas' ``NA``/``NaT`` become ``None``.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else _bad_float(value, where, path, nan_to_none)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()):
            return t.tolist()
        if t.is_floating_point() and bool(torch.isfinite(t).all()):
            return t.tolist()
        return _jsonable(t.tolist(), where, path, nan_to_none=nan_to_none)  # slow path: find it
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biu":
                return value.tolist()
            if value.dtype.kind == "f" and bool(np.isfinite(value).all()):
                return value.tolist()
            return _jsonable(value.tolist(), where, path, nan_to_none=nan_to_none)
        if isinstance(value, np.generic):
            return _jsonable(value.item(), where, path, nan_to_none=nan_to_none)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            k = _json_key(key, where, path)
            out[k] = _jsonable(item, where, f"{path}[{k!r}]", nan_to_none=nan_to_none)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        if isinstance(value, set | frozenset):
            with suppress(TypeError):  # sorted when the items can be ordered
                items = sorted(items)
        return [_jsonable(v, where, f"{path}[{i}]", nan_to_none=nan_to_none)
                for i, v in enumerate(items)]
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name), where, f"{path}[{f.name!r}]",
                                  nan_to_none=nan_to_none)
                for f in dataclasses.fields(value)}
    pd = sys.modules.get("pandas")
    if pd is not None and (value is pd.NA or value is pd.NaT):
        return None
    for method in ("item", "tolist"):  # other array libraries' scalars and arrays
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                plain = convert()
            except (TypeError, ValueError):
                continue
            if plain is not value:
                return _jsonable(plain, where, path, nan_to_none=nan_to_none)
    return str(value)


def _dumps(value: Any) -> str:
    """JSON text of already plain data; never writes ``NaN``/``Infinity`` (invalid JSON)."""
    return json.dumps(value, allow_nan=False)


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
    def run(self, kind: str, *, config: Mapping[str, Any] | Any = None, model: Any = None,
            model_spec: str | None = None, seed: int | None = None) -> RunWriter:
        """Start a run; use it as a context manager (see :class:`RunWriter`).

        Raises:
            StoreError: the store was opened with ``readonly=True``.
            InputError: ``config`` holds a NaN or infinite value.
        """
        return RunWriter(self, kind, config=config, model=model, model_spec=model_spec, seed=seed)

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
                             "`mechscope runs --store DIR` lists them")
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


def _table_payload(name: str, data: Any) -> dict[str, Any]:
    """Records + columns from a DataFrame, a list of dicts, or a dict of columns.

    Cells go through :func:`_jsonable`: NaN (and pandas' NA/NaT) become ``None`` (a missing
    cell), while +-inf is an :class:`InputError` naming the row and column, since ``None`` would
    silently turn "infinitely large" into "missing".
    """
    if hasattr(data, "to_dict") and hasattr(data, "columns"):
        columns = [str(c) for c in data.columns]
        records = data.to_dict("records")
    elif isinstance(data, Mapping):
        columns = [str(c) for c in data]
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise InputError(f"table columns have different lengths: {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        records = [{c: data[c][i] for c in data} for i in range(n)]
    elif isinstance(data, Sequence):
        records = [dict(r) for r in data]
        columns = list(dict.fromkeys(k for r in records for k in r))
    else:
        raise InputError(f"a table is a DataFrame, a list of dicts or a dict of columns, not {type(data).__name__}")
    where = f"table {name!r}"
    records = [{str(key): _jsonable(value, where, f"[{i}][{str(key)!r}]", nan_to_none=True)
                for key, value in rec.items()} for i, rec in enumerate(records)]
    return {"columns": columns, "records": records}


class RunWriter:
    """A run being written; results become visible only when the ``with`` block succeeds."""

    def __init__(self, store: Store, kind: str, *, config: Any, model: Any,
                 model_spec: str | None, seed: int | None) -> None:
        from mechscope.models.loading import fingerprint, spec_of

        store._require_writable("write runs")
        self.store = store
        self.kind = kind
        self.id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        if config is not None and hasattr(config, "__dataclass_fields__"):
            from dataclasses import asdict

            config = asdict(config)
        self.config = dict(config or {})
        self._config_json = _dumps(_jsonable(self.config, "the run config"))
        self.model_spec = model_spec or (spec_of(model) if model is not None else None)
        self.fingerprint = fingerprint(model) if model is not None else None
        self.seed = seed
        self.timings: dict[str, float] = {}
        self._tables: dict[str, dict[str, Any]] = {}
        self._json: dict[str, Any] = {}
        self._tensors: dict[str, str] = {}
        self._staging = store.root / "tensors" / f".staging-{self.id}"
        self._t0 = 0.0

    def __enter__(self) -> RunWriter:
        self._t0 = time.time()
        with self.store._transaction() as con:
            con.execute(
                "INSERT INTO runs (id, kind, status, created, config, model_spec, "
                "model_fingerprint, versions, seed, host, pid) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (self.id, self.kind, "running", self._t0, self._config_json, self.model_spec,
                 self.fingerprint, _dumps(package_versions()), self.seed, socket.gethostname(),
                 os.getpid()),
            )
        return self

    def _check_name(self, name: str) -> None:
        if not name or "/" in name or name.startswith("."):
            raise InputError(f"result name {name!r} must be non-empty, without '/' or a leading '.'")
        if name in self._tables or name in self._json or name in self._tensors:
            raise InputError(f"this run already has a result named {name!r}")

    def add_table(self, name: str, data: Any) -> None:
        """Stage a table (DataFrame, list of dicts, or dict of columns).

        Cells may be numpy/torch scalars. A NaN cell is stored as ``None`` (missing); an
        infinite cell is refused.

        Raises:
            InputError: a bad or repeated name, columns of different lengths, or a +-inf cell
                (the message names the row and column).
        """
        self._check_name(name)
        self._tables[name] = _table_payload(name, data)

    def add_json(self, name: str, value: Any) -> None:
        """Stage a JSON value, converted and checked now (later changes to ``value`` are not seen).

        Beyond plain JSON types, ``value`` may contain numpy arrays and scalars, torch tensors,
        dataclass instances, paths, tuples and sets (at any depth); other objects are stored as
        ``str(obj)``.

        Raises:
            InputError: a bad or repeated name, or a NaN or +-inf anywhere in ``value``; the
                message names the result and the path of the value, e.g.
                ``result 'summary' has NaN at ['scores'][3]``.
        """
        self._check_name(name)
        self._json[name] = _jsonable(value, f"result {name!r}")

    def add_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Stage named tensors; written to the staging folder now, moved into place on commit."""
        from safetensors.torch import save_file

        self._check_name(name)
        self._staging.mkdir(parents=True, exist_ok=True)
        path = self._staging / f"{name}.safetensors"
        # safetensors writes owner-only (0600) files; give it the mode the umask allows instead,
        # read off a file created the ordinary way.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o666)
        try:
            mode = os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
        os.chmod(path, mode)
        self._tensors[name] = f"tensors/{self.id}/{name}.safetensors"

    def time(self, label: str, seconds: float) -> None:
        """Record a timing (seconds) under ``label``.

        Raises:
            InputError: ``seconds`` is NaN or infinite.
        """
        seconds = float(seconds)
        if not math.isfinite(seconds):
            raise InputError(f"timing {label!r} is {seconds}; time a finite number of seconds")
        self.timings[label] = seconds

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        now = time.time()
        self.timings.setdefault("total", now - self._t0)
        if exc_type is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            with self.store._transaction() as con:
                con.execute(
                    "UPDATE runs SET status='failed', finished=?, timings=?, error=? WHERE id=?",
                    (now, _dumps(self.timings), f"{exc_type.__name__}: {exc}", self.id),
                )
            return
        final = self.store.root / "tensors" / self.id
        if self._tensors:
            os.replace(self._staging, final)
        try:
            with self.store._transaction() as con:
                for name, payload in self._tables.items():
                    con.execute("INSERT INTO results VALUES (?,?,?,?)",
                                (self.id, name, "table", _dumps(payload)))
                for name, value in self._json.items():
                    con.execute("INSERT INTO results VALUES (?,?,?,?)",
                                (self.id, name, "json", _dumps(value)))
                for name, file in self._tensors.items():
                    con.execute("INSERT INTO results VALUES (?,?,?,?)",
                                (self.id, name, "tensors", _dumps({"file": file})))
                con.execute(
                    "UPDATE runs SET status='complete', finished=?, timings=? WHERE id=?",
                    (now, _dumps(self.timings), self.id),
                )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            with self.store._transaction() as con:
                con.execute("UPDATE runs SET status='failed', finished=?, error=? WHERE id=?",
                            (time.time(), "could not commit the results", self.id))
            raise
