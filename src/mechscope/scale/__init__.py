"""Sweeps beyond one process: the same analysis functions, run shard by shard on Ray.

A *sweep* is an analysis over many items (prompts, prompt pairs, facts). Its items are split into
contiguous *shards* by a plan that depends only on the items and ``shard_size``, never on the
backend or the number of workers; each shard runs the same local function
(``fn(model, shard, **kwargs)``), and the shard results are merged in shard order by the driver,
which alone writes the store. So a sweep gives the same numbers, bit for bit, on every backend.

- ``backend="local"`` (the default): the shards run one after another in this process.
- ``backend="ray"``: each shard is a task on an actor that holds the model, loaded from its spec
  in the worker (one actor per GPU where the cluster has GPUs, else CPUs split evenly between
  the actors) and checked against the driver's model by fingerprint. ``address`` names a
  running cluster; without one, a local cluster is started (loopback only) and reused by later
  sweeps of this process. Actors are kept for later sweeps of the same model
  (:func:`shutdown_workers` ends them).

Faults: a worker that dies (killed, out of memory, its node lost) is replaced by a new one and
its shard is run again, on the new worker or another; a shard whose function raises is retried
too, up to ``retries`` extra attempts. Bad input (a :class:`~mechscope.errors.MechscopeError`
from the function or from loading the model) is raised at once, never retried. A shard that
still fails is reported in :class:`SweepIncomplete` with its error, and nothing is merged: a
sweep is complete or it is an error, never silently partial (:func:`record_incomplete` marks a
store run failed with the report). One progress bar counts the items of the whole sweep.

Ray is imported only when ``backend="ray"`` is used; install it with ``pip install
"mechscope[ray]"``.

>>> from mechscope.models import load
>>> model = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8")
>>> out, stats = map_shards(model, lambda m, shard: sum(shard), plan(list(range(10)), 4),
...                         progress=False)
>>> out, stats.shards, stats.backend
([6, 22, 17], 3, 'local')
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mechscope.errors import InputError, MechscopeError
from mechscope.types import Model

__all__ = ["BACKENDS", "Backend", "ShardFailure", "SweepIncomplete", "SweepStats", "as_backend",
           "map_shards", "plan", "record_incomplete", "shutdown_workers"]  # fmt: skip

BACKENDS = ("local", "ray")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Backend:
    """Where a sweep's shards run.

    Attributes:
        kind: ``local`` (this process, shard after shard) or ``ray``.
        address: a Ray cluster's address (``ray://host:10001`` or ``host:6379``); None: the
            cluster this process is connected to, else a new local one (loopback only).
        workers: actors; None: one per GPU where the cluster has GPUs, else one per CPU, at
            most one per shard.
        retries: extra attempts of a shard after its worker died or its function raised.
        shard_size: items per shard; None: the sweep's default (its docstring says which).
        device: the workers' device (``cpu``, ``cuda``); None: ``cuda`` where the cluster has
            GPUs, else ``cpu``.
        threads: torch threads per CPU worker; None: this process's ``torch.get_num_threads()``,
            because torch's CPU kernels may split a reduction differently with another thread
            count, and a sweep is to give the local backend's numbers bit for bit. Set 1 for
            throughput where that does not matter (each actor reserves ``CPUs / workers``).
    """

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    retries: int = 2
    shard_size: int | None = None
    device: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise InputError(f"unknown backend {self.kind!r}; choose 'local' or 'ray'")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise InputError(f"workers must be an int >= 1, got {self.workers!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise InputError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.shard_size is not None and (not isinstance(self.shard_size, int) or self.shard_size < 1):
            raise InputError(f"shard_size must be an int >= 1, got {self.shard_size!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(f"threads must be an int >= 1, got {self.threads!r}")
        if self.address is not None and self.kind != "ray":
            raise InputError(f"address={self.address!r} names a Ray cluster; add backend='ray'")

    @property
    def distributed(self) -> bool:
        return self.kind == "ray"

    @property
    def sharded(self) -> bool:
        """Whether a sweep takes the sharded path: on Ray, or locally with a ``shard_size``
        (an unsharded local call runs the analysis as it always did)."""
        return self.distributed or self.shard_size is not None


def as_backend(backend: str | Backend | None, **fields: Any) -> Backend:
    """A :class:`Backend` from a name (``"local"``, ``"ray"``) or a Backend, with ``fields``
    (those not None) replacing its own.

    >>> as_backend("ray", workers=2).workers
    2
    """
    given = {k: v for k, v in fields.items() if v is not None}
    if backend is None:
        backend = "local"
    if isinstance(backend, Backend):
        if not given:
            return backend
        from dataclasses import replace

        return replace(backend, **given)
    if not isinstance(backend, str):
        raise InputError(f"backend must be 'local', 'ray' or a Backend, got {type(backend).__name__}")
    return Backend(kind=backend.strip().lower(), **given)


def plan(items: Sequence[T], shard_size: int) -> list[list[T]]:
    """Contiguous shards of ``shard_size`` items (the last may be shorter), in order.

    >>> plan([1, 2, 3, 4, 5], 2)
    [[1, 2], [3, 4], [5]]
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size must be an int >= 1, got {shard_size!r}")
    items = list(items)
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)]


@dataclass(frozen=True)
class ShardFailure:
    """A shard that failed after all its attempts: which items, how often, and the last error."""

    shard: int
    first_item: int
    n_items: int
    attempts: int
    error: str

    def describe(self) -> str:
        last = self.first_item + self.n_items - 1
        return (f"shard {self.shard} (items {self.first_item}-{last}) failed {self.attempts} "
                f"time(s): {self.error}")  # fmt: skip


class SweepIncomplete(MechscopeError, RuntimeError):
    """Some shards of a sweep failed after their retries; nothing was merged.

    Attributes:
        failures: the failed shards with their errors.
        completed: shard index -> result of the shards that did finish (for salvage; the
            sweep's own result is not built from them).
        n_shards: shards in the sweep.
    """

    def __init__(self, what: str, failures: Sequence[ShardFailure], completed: Mapping[int, Any],
                 n_shards: int) -> None:  # fmt: skip
        self.failures = list(failures)
        self.completed = dict(completed)
        self.n_shards = n_shards
        lines = "; ".join(f.describe() for f in self.failures[:3])
        more = f" (and {len(self.failures) - 3} more)" if len(self.failures) > 3 else ""
        super().__init__(f"incomplete sweep ({what}): {len(self.failures)} of {n_shards} shards "
                         f"failed after their retries, so no result was merged: {lines}{more}. "
                         "Fix the cause and run the sweep again (raise Backend.retries for "
                         "flaky workers)")  # fmt: skip


@dataclass
class SweepStats:
    """What a sweep did: backend, shards, workers, retries and worker deaths, wall time."""

    backend: str
    shards: int
    shard_size: int
    items: int
    workers: int = 1
    attempts: int = 0
    retried: list[int] = field(default_factory=list)
    worker_deaths: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "shards": self.shards, "shard_size": self.shard_size,
                "items": self.items, "workers": self.workers, "attempts": self.attempts,
                "retried": list(self.retried), "worker_deaths": self.worker_deaths,
                "seconds": round(self.seconds, 3)}  # fmt: skip


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not progress,
                leave=False)  # fmt: skip


def map_shards(model: Model, fn: Callable[..., T], shards: Sequence[Sequence[Any]], *,
               backend: str | Backend = "local", kwargs: Mapping[str, Any] | None = None,
               desc: str = "sweep", progress: bool = True,
               on_result: Callable[[int, T], None] | None = None) -> tuple[list[T], SweepStats]:  # fmt: skip
    """Run ``fn(model, shard, **kwargs)`` on every shard; return the results in shard order.

    With ``on_result``, each shard's result is handed to ``on_result(index, result)`` in shard
    order as soon as it and every shard before it are done (e.g. written to disk), and not
    kept: the returned list then holds None for each shard.

    ``fn`` must be a module-level function (Ray sends it to the workers by reference) that
    returns a picklable value. With Ray the workers load the model from its spec; ``model``
    must come from :func:`mechscope.models.load`.

    Raises:
        SweepIncomplete: a shard failed after its retries (Ray).
        MechscopeError: bad input from ``fn`` or from loading the model in a worker.
        MissingPackageError: ``backend="ray"`` without Ray installed.
    """
    b = as_backend(backend)
    kwargs = dict(kwargs or {})
    lists: list[list[Any]] = [list(s) for s in shards]
    shards = lists
    if not shards:
        raise InputError("a sweep needs at least one item")
    sizes = [len(s) for s in shards]
    stats = SweepStats(backend=b.kind, shards=len(shards), shard_size=max(sizes), items=sum(sizes))
    start = time.perf_counter()
    results: list[Any] = []

    def emit(i: int, result: Any) -> None:  # called in shard order
        if on_result is None:
            results.append(result)
        else:
            on_result(i, result)
            results.append(None)

    bar = _bar(stats.items, desc, progress)
    try:
        if b.kind == "ray":
            from mechscope.scale._ray import run_on_ray

            try:
                run_on_ray(model, fn, lists, kwargs, b, stats, bar, desc, emit)
            except SweepIncomplete as exc:  # what was merged in order so far is salvage too
                exc.completed.update({i: r for i, r in enumerate(results) if on_result is None})
                raise
        else:
            for i, shard in enumerate(shards):
                emit(i, fn(model, shard, **kwargs))
                stats.attempts += 1
                bar.update(len(shard))
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return results, stats


def default_workers(n_shards: int, gpus: float, cpus: float, workers: int | None) -> int:
    """Actors for a sweep: the asked number, else one per GPU (or CPU), never more than shards.

    >>> default_workers(10, 0.0, 2.0, None), default_workers(10, 4.0, 32.0, None), default_workers(1, 0.0, 8.0, 4)
    (2, 4, 1)
    """
    n = workers or int(gpus) or max(1, int(cpus))
    return max(1, min(n, n_shards))


def shutdown_workers() -> None:
    """End the Ray actors that hold models for sweeps (the cluster itself is left running)."""
    if "mechscope.scale._ray" in sys.modules:
        sys.modules["mechscope.scale._ray"].shutdown_pool()


def record_incomplete(store: Any, kind: str, error: SweepIncomplete, *, model: Model | None = None,
                      config: Mapping[str, Any] | None = None) -> str:  # fmt: skip
    """Record a sweep that did not complete as a failed run of ``store`` whose error is the
    failure report (what failed, how often, why); return the run id. Nothing is staged, so no
    partial result is ever visible."""
    failures = [{"shard": f.shard, "first_item": f.first_item, "n_items": f.n_items,
                 "attempts": f.attempts, "error": f.error} for f in error.failures]  # fmt: skip
    cfg = {**dict(config or {}), "incomplete": {"n_shards": error.n_shards, "failures": failures}}
    try:
        with store.run(kind, config=cfg, model=model) as run:
            run_id = str(run.id)
            raise error
    except SweepIncomplete:
        pass
    return run_id


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (shards of whole batches).

    >>> round_up(10, 8), round_up(16, 8)
    (16, 16)
    """
    return max(multiple, int(math.ceil(n / multiple)) * multiple)
