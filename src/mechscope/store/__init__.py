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
timeout).

>>> import tempfile, torch
>>> store = Store(tempfile.mkdtemp())
>>> with store.run("example", config={"n": 2}, seed=0) as run:
...     run.add_table("scores", [{"head": "0.1", "score": 0.5}])
...     run.add_tensors("acts", {"x": torch.ones(2)})
>>> [r.status for r in store.runs()]
['complete']
>>> store.table(run.id, "scores").to_dict("records")
[{'head': '0.1', 'score': 0.5}]
"""

from __future__ import annotations

from mechscope.store.db import RunRecord, RunWriter, Store

__all__ = ["RunRecord", "RunWriter", "Store"]
