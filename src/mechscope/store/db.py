"""SQLite + safetensors implementation of the run store (see :mod:`mechscope.store`)."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import InputError, StoreError

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


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, allow_nan=True)


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
    """A run store rooted at a directory (created if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file; a store is a directory")
        (self.root / "tensors").mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "store.db"
        with self._connect() as con:
            con.executescript(SCHEMA)
        self._reap_dead_runs()

    # -- connections -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

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
        for staging in (self.root / "tensors").glob(".staging-*"):
            run_id = staging.name.removeprefix(".staging-")
            rec = self._maybe_run(run_id)
            if rec is None or rec.status != "running":
                shutil.rmtree(staging, ignore_errors=True)

    # -- writing -----------------------------------------------------------------------------
    def run(self, kind: str, *, config: Mapping[str, Any] | Any = None, model: Any = None,
            model_spec: str | None = None, seed: int | None = None) -> RunWriter:
        """Start a run; use it as a context manager (see :class:`RunWriter`)."""
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
        """Delete a run, its results and its tensor files."""
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


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"], kind=row["kind"], status=row["status"], created=row["created"],
        finished=row["finished"], config=json.loads(row["config"]),
        model_spec=row["model_spec"], model_fingerprint=row["model_fingerprint"],
        versions=json.loads(row["versions"]), seed=row["seed"],
        timings=json.loads(row["timings"]), error=row["error"],
    )


def _table_payload(data: Any) -> dict[str, Any]:
    """Records + columns from a DataFrame, a list of dicts, or a dict of columns."""
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
    for rec in records:
        for key, value in rec.items():
            if isinstance(value, float) and math.isnan(value):
                rec[key] = None
    return {"columns": columns, "records": records}


class RunWriter:
    """A run being written; results become visible only when the ``with`` block succeeds."""

    def __init__(self, store: Store, kind: str, *, config: Any, model: Any,
                 model_spec: str | None, seed: int | None) -> None:
        from mechscope.models.loading import fingerprint, spec_of

        self.store = store
        self.kind = kind
        self.id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        if config is not None and hasattr(config, "__dataclass_fields__"):
            from dataclasses import asdict

            config = asdict(config)
        self.config = dict(config or {})
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
                (self.id, self.kind, "running", self._t0, _dumps(self.config), self.model_spec,
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
        """Stage a table (DataFrame, list of dicts, or dict of columns)."""
        self._check_name(name)
        self._tables[name] = _table_payload(data)

    def add_json(self, name: str, value: Any) -> None:
        """Stage a JSON-serialisable value."""
        self._check_name(name)
        self._json[name] = json.loads(_dumps(value))

    def add_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Stage named tensors; written to the staging folder now, moved into place on commit."""
        from safetensors.torch import save_file

        self._check_name(name)
        self._staging.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(self._staging / f"{name}.safetensors"))
        self._tensors[name] = f"tensors/{self.id}/{name}.safetensors"

    def time(self, label: str, seconds: float) -> None:
        """Record a timing (seconds) under ``label``."""
        self.timings[label] = float(seconds)

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
