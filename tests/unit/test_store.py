"""The run store: transactional runs, failure handling, concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time

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
