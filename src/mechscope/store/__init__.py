"""The run store: one directory holding every run and its results.

``<root>/store.db`` is SQLite in WAL mode: runs (config, model spec and fingerprint, package
versions, seed, timings, status) and results (tables as JSON records, small JSON values, and
references to tensor files). Tensors go to ``<root>/tensors/<run_id>/<name>.safetensors``.

Writes are transactional. Inside ``with store.run(...) as run:`` results are staged (tensors in a
hidden staging folder, tables in memory); only when the block ends without error are the tensor
files moved into place and every result row inserted, in one transaction, together with
``status = 'complete'``. A block that raises (or is interrupted) marks the run ``failed`` and its
staged results vanish; a process killed outright leaves a ``running`` row that the next
:class:`Store` opening marks ``failed`` when its process is gone. Readers only ever see results of
complete runs. Several processes may write to one store at once (SQLite's locking plus a busy
timeout). A writer opening the store also deletes the tensor folders that crashes leave behind
(folders of runs that are neither complete nor still running), so a crash at any moment leaves
neither half a result nor stray files.

``Store(root, readonly=True)`` is for readers (the dashboard, reports, ``mechscope runs``): it
changes nothing on disk, creates no folder, reaps nothing, refuses :meth:`Store.run` and
:meth:`Store.delete_run`, and works on folders and file systems the user cannot write to.

The database records its schema version (``PRAGMA user_version``, :data:`SCHEMA_VERSION`); a store
written by a newer mechscope is refused with a message to upgrade. Stored JSON is always valid
JSON: numpy and torch values are converted, and a NaN or infinity in a JSON result is an
:class:`~mechscope.errors.InputError` naming where it is (in a table a NaN cell becomes ``None``,
an infinite one is an error). Files and folders get the modes the user's umask allows.

>>> import tempfile, torch
>>> store = Store(tempfile.mkdtemp())
>>> with store.run("example", config={"n": 2}, seed=0) as run:
...     run.add_table("scores", [{"head": "0.1", "score": 0.5}])
...     run.add_tensors("acts", {"x": torch.ones(2)})
>>> [r.status for r in store.runs()]
['complete']
>>> store.table(run.id, "scores").to_dict("records")
[{'head': '0.1', 'score': 0.5}]
>>> Store(store.root, readonly=True).latest("example").id == run.id
True
"""

from __future__ import annotations

from mechscope.store.db import SCHEMA_VERSION, RunRecord, Store
from mechscope.store.writer import RunWriter

__all__ = ["SCHEMA_VERSION", "RunRecord", "RunWriter", "Store"]
