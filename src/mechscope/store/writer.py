"""The run writer: stages a run's results and commits them in one transaction."""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from mechscope._fs import apply_umask
from mechscope.errors import InputError
from mechscope.store.jsonsafe import _dumps, _jsonable, _table_payload, package_versions

if TYPE_CHECKING:
    from mechscope.store.db import Store
    from mechscope.types import Model

class RunWriter:
    """A run being written; results become visible only when the ``with`` block succeeds."""

    def __init__(self, store: Store, kind: str, *, config: Any, model: Model | None,
                 model_spec: str | None, seed: int | None,
                 model_fingerprint: str | None = None) -> None:
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
        self.fingerprint = model_fingerprint or (fingerprint(model) if model is not None else None)
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
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
        apply_umask(path)  # safetensors writes owner-only (0600) files; the umask decides
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
