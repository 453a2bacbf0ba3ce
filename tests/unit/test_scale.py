"""Sweeps on the local and the Ray backend (mechscope.scale): the same numbers bit for bit, a
killed worker survived without losing or duplicating a shard, a failing shard reported and the
run marked failed, bad input raised at once, Ray never imported by the local backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechscope.attribution import causal_trace, causal_traces, patch_sweep
from mechscope.circuits import head_statistics
from mechscope.circuits.sae import task_batch
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.probes import trace
from mechscope.results import same
from mechscope.scale import (
    Backend,
    SweepIncomplete,
    as_backend,
    map_shards,
    plan,
    record_incomplete,
)
from mechscope.store import Store

RAY2 = Backend(kind="ray", workers=2)


def _same_fields(a, b, skip=("provenance",)) -> bool:
    from dataclasses import fields

    return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a) if f.name not in skip)


@pytest.fixture(scope="module")
def induction():
    return load("zoo:induction")


@pytest.fixture(scope="module")
def ragged(induction):
    """Prompts of different lengths (head statistics sorts them by length into batches)."""
    g = torch.Generator().manual_seed(0)
    n_ctx = int(induction.cfg.n_ctx)
    return [torch.randint(3, 20, (int(n),), generator=g).tolist()
            for n in torch.randint(4, n_ctx - 1, (21,), generator=g)]  # fmt: skip


@pytest.fixture(scope="module")
def facts_model():
    return load("zoo:facts")


def _facts(model, n=5):
    b = task_batch(model, None, n, 0)
    return [(b.clean[i, : int(b.real_lengths[i])].tolist(), (1, int(b.answer_pos[i])))
            for i in range(n)]  # fmt: skip


# -- the plan and the options --------------------------------------------------------------------


def test_plan_is_contiguous_and_covers_every_item_once():
    items = list(range(23))
    shards = plan(items, 5)
    assert [len(s) for s in shards] == [5, 5, 5, 5, 3]
    assert [x for s in shards for x in s] == items


@pytest.mark.parametrize("bad, fix", [
    (dict(kind="spark"), "choose 'local' or 'ray'"),
    (dict(kind="ray", workers=0), "workers must be"),
    (dict(kind="ray", retries=-1), "retries must be"),
    (dict(kind="ray", shard_size=0), "shard_size must be"),
    (dict(kind="ray", threads=0), "threads must be"),
    (dict(kind="local", address="127.0.0.1:6379"), "add backend='ray'"),
])  # fmt: skip
def test_bad_backend_options_name_the_fix(bad, fix):
    with pytest.raises(InputError, match=fix):
        Backend(**bad)


def test_as_backend_reads_names_and_overrides():
    assert as_backend(None).kind == "local"
    assert as_backend(" Ray ", workers=3).workers == 3
    assert as_backend(RAY2, shard_size=4).shard_size == 4


def test_local_backend_never_imports_ray():
    code = ("import sys, torch\n"
            "from mechscope.models import load\n"
            "from mechscope.circuits import head_statistics\n"
            "m = load('native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=16')\n"
            "head_statistics(m, torch.randint(0, 11, (6, 8)), backend='local', shard_size=2, "
            "progress=False)\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- local sharding: whole batches give the unsharded numbers -------------------------------------


def test_local_shards_of_whole_batches_equal_the_unsharded_run(induction, ragged):
    a = head_statistics(induction, ragged, batch_size=4, progress=False)
    b = head_statistics(induction, ragged, batch_size=4, progress=False, shard_size=8)
    assert _same_fields(a, b)
    ta = trace(induction, ragged, sites=("heads", "patterns"), batch_size=4, progress=False)
    tb = trace(induction, ragged, sites=("heads", "patterns"), batch_size=4, progress=False,
               shard_size=5)  # rounded up to whole batches (8)
    assert _same_fields(ta, tb)


def test_sharded_trace_streams_to_a_folder_in_order(induction, ragged, tmp_path):
    from mechscope.probes import open_trace

    ta = trace(induction, ragged, sites=("resid",), batch_size=4, progress=False)
    trace(induction, ragged, sites=("resid",), batch_size=4, progress=False, shard_size=8,
          out_dir=tmp_path / "t")
    tb = open_trace(tmp_path / "t")
    assert same(dict(ta.tensors), dict(tb.tensors)) and same(ta.tokens, tb.tokens)


def test_patching_in_one_shard_is_the_unsharded_sweep_and_shards_merge_by_rows():
    model = load("zoo:ioi")
    task = task_batch(model, None, 10, 0)
    whole = patch_sweep(model, task, site="heads", by="all", progress=False)
    one = patch_sweep(model, task, site="heads", by="all", progress=False, shard_size=10)
    assert _same_fields(whole, one)
    split = patch_sweep(model, task, site="heads", by="all", progress=False, shard_size=3)
    assert split.work["shards"] == 4
    assert torch.allclose(split.scores, whole.scores, atol=1e-5)
    assert torch.allclose(split.raw_scores, whole.raw_scores, atol=1e-5)
    assert split.metric_clean == pytest.approx(whole.metric_clean, abs=1e-5)
    with pytest.raises(InputError, match="custom metric"):
        patch_sweep(model, task, metric=lambda lg: lg[:, -1, 0].mean(), shard_size=3,
                    progress=False)  # fmt: skip


def test_causal_traces_are_each_facts_own_trace(facts_model):
    facts = _facts(facts_model, 3)
    sweep = causal_traces(facts_model, facts, samples=3, progress=False)
    for (prompt, subject), r in zip(facts, sweep.traces, strict=True):
        alone = causal_trace(facts_model, prompt, subject, samples=3, progress=False)
        assert _same_fields(r, alone)
    assert sweep.aggregate.n_prompts == 3
    assert list(sweep.to_frame()["fact"]) == [0, 1, 2]
    with pytest.raises(InputError, match="at least one fact"):
        causal_traces(facts_model, [])
    with pytest.raises(InputError, match="fact 1 has keys"):
        causal_traces(facts_model, [{"prompt": [1, 2, 3], "subject": (1, 2)}, {"text": "x"}])


# -- Ray: the same numbers, bit for bit ------------------------------------------------------------


def test_ray_gives_the_local_numbers_bit_for_bit(ray_cluster, induction, ragged, facts_model):
    a = head_statistics(induction, ragged, batch_size=4, progress=False)
    b = head_statistics(induction, ragged, batch_size=4, progress=False, backend=RAY2,
                        shard_size=4)  # fmt: skip
    assert _same_fields(a, b)
    ta = trace(induction, ragged, sites=("heads", "patterns", "resid"), batch_size=4,
               progress=False)  # fmt: skip
    tb = trace(induction, ragged, sites=("heads", "patterns", "resid"), batch_size=4,
               progress=False, backend=RAY2)  # fmt: skip
    assert _same_fields(ta, tb)
    facts = _facts(facts_model, 4)
    ca = causal_traces(facts_model, facts, samples=3, progress=False)
    cb = causal_traces(facts_model, facts, samples=3, progress=False, backend=RAY2)
    assert all(_same_fields(x, y) for x, y in zip(ca.traces, cb.traces, strict=True))
    assert _same_fields(ca.aggregate, cb.aggregate)


def test_ray_patching_over_many_pairs_equals_local_with_the_same_shards(ray_cluster):
    model = load("zoo:ioi")
    task = task_batch(model, None, 12, 1)
    a = patch_sweep(model, task, site="heads", by="all", progress=False, shard_size=5)
    b = patch_sweep(model, task, site="heads", by="all", progress=False, backend=RAY2,
                    shard_size=5)  # fmt: skip
    assert _same_fields(a, b)


# -- faults ------------------------------------------------------------------------------------------


def _double(model, shard, **_):
    return [2 * x for x in shard]


def _die_once(model, shard, *, marker: str):
    """Kill this worker (SIGKILL, as the OOM killer would) the first time shard [2, 3] runs."""
    if 2 in shard and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return [(2 * x, os.getpid()) for x in shard]


def _fail_shard(model, shard, *, bad: int, kind: str = "runtime"):
    if bad in shard:
        if kind == "input":
            raise InputError("prompt 5 is empty; give it some text")
        raise RuntimeError("boom")
    return [2 * x for x in shard]


@pytest.fixture
def by_value():
    """Send this module's functions to the Ray workers by value (tests/ is not importable there)."""
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def test_a_killed_worker_loses_and_duplicates_no_shard(ray_cluster, by_value, induction, tmp_path):
    shards = plan(list(range(10)), 2)
    marker = str(tmp_path / "killed")
    out, stats = map_shards(induction, _die_once, shards, backend=RAY2,
                            kwargs={"marker": marker}, progress=False)  # fmt: skip
    assert [v for part in out for v, _ in part] == [2 * x for x in range(10)]  # each once, in order
    killed = int(Path(marker).read_text())
    assert stats.worker_deaths == 1 and stats.retried == [1]
    assert stats.attempts == len(shards) + 1
    assert killed not in {pid for v, pid in out[1]}  # shard 1 ran again, on another worker


def test_a_worker_killed_mid_sweep_of_head_statistics(ray_cluster, by_value, induction, ragged,
                                                       tmp_path, monkeypatch):  # fmt: skip
    import mechscope.scale.sweeps as sweeps

    marker = tmp_path / "killed"

    def dying(model, rows, **options):  # runs in the workers, sent by value
        from mechscope.circuits.head_stats import head_statistics as local

        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return local(model, rows, progress=False, **options)

    monkeypatch.setattr(sweeps, "head_stats_shard", dying)
    local = head_statistics(induction, ragged, batch_size=4, progress=False)
    ray = head_statistics(induction, ragged, batch_size=4, progress=False, backend=RAY2,
                          shard_size=4)  # fmt: skip
    assert marker.exists()
    assert _same_fields(local, ray)


def test_a_shard_failing_after_its_retries_is_reported_and_the_run_marked_failed(
        ray_cluster, by_value, induction, tmp_path):  # fmt: skip
    shards = plan(list(range(8)), 2)
    with pytest.raises(SweepIncomplete) as info:
        map_shards(induction, _fail_shard, shards, backend=Backend(kind="ray", workers=2, retries=1),
                   kwargs={"bad": 5}, desc="test sweep", progress=False)  # fmt: skip
    err = info.value
    assert [(f.shard, f.first_item, f.n_items, f.attempts) for f in err.failures] == [(2, 4, 2, 2)]
    assert "RuntimeError: boom" in err.failures[0].error and "1 of 4 shards" in str(err)
    assert sorted(err.completed) == [0, 1, 3]  # salvage: never merged into a result
    store = Store(tmp_path / "store")
    run_id = record_incomplete(store, "head_statistics", err, model=induction)
    rec = store.get_run(run_id)
    assert rec.status == "failed" and "incomplete sweep (test sweep)" in (rec.error or "")
    assert store.result_names(run_id) == {}


def test_bad_input_in_a_shard_is_raised_at_once_not_retried(ray_cluster, by_value, induction):
    with pytest.raises(InputError, match="prompt 5 is empty"):
        map_shards(induction, _fail_shard, plan(list(range(8)), 2), backend=RAY2,
                   kwargs={"bad": 5, "kind": "input"}, progress=False)  # fmt: skip


def test_one_progress_bar_counts_the_items_of_the_whole_sweep(ray_cluster, by_value, induction,
                                                               monkeypatch):  # fmt: skip
    import mechscope.scale as scale

    bars = []
    make = scale._bar

    def recording(total, desc, progress):
        bar = make(total, desc, progress)
        bars.append((bar, desc))
        return bar

    monkeypatch.setattr(scale, "_bar", recording)
    map_shards(induction, _double, plan(list(range(12)), 3), backend=RAY2, desc="my sweep")
    assert [(b.total, b.n, desc) for b, desc in bars] == [(12, 12, "my sweep")]


def test_ray_needs_a_model_loaded_from_a_spec_and_unchanged_weights(ray_cluster, by_value):
    from transformer_lens.model_bridge import TransformerBridge

    from mechscope.models.native import boot_native_config, parse_native_spec

    bare = boot_native_config(parse_native_spec("n_layers=1,d_model=16,n_heads=2,d_head=8,"
                                                "d_vocab=11,n_ctx=8"))  # fmt: skip
    assert isinstance(bare, TransformerBridge)
    with pytest.raises(InputError, match="no spec"):
        map_shards(bare, _double, [[1]], backend=RAY2, progress=False)
    edited = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8,seed=3")
    with torch.no_grad():
        next(edited.parameters()).add_(1.0)
    with pytest.raises(InputError, match="differs from yours"):
        map_shards(edited, _double, [[1]], backend=RAY2, progress=False)


@pytest.mark.parametrize("address, why", [("127.0.0.1:1", "nothing answers"),
                                          ("nonsense", "is not HOST:PORT")])
def test_a_ray_address_nothing_answers_at_is_refused_in_seconds(address, why):
    from mechscope.scale._ray import _reachable

    with pytest.raises(InputError, match=why):
        _reachable(address)
