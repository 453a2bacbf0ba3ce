"""The Ray side of :func:`mechscope.scale.map_shards`: actors that hold a model, a driver loop
that hands them shards, replaces dead ones, retries and reports failures.

Imported only when a sweep asks for ``backend="ray"``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mechscope.errors import InputError, MechscopeError, MissingPackageError
from mechscope.scale import Backend, ShardFailure, SweepIncomplete, SweepStats, default_workers
from mechscope.types import Model

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised where Ray is missing
    raise MissingPackageError("Ray (for backend='ray')", 'pip install "mechscope[ray]"') from exc

#: seconds to wait for workers to be scheduled and load their model
START_TIMEOUT = float(os.environ.get("MECHSCOPE_RAY_START_TIMEOUT", "600"))
# (job id, spec, fingerprint, device, torch threads, CPUs reserved) -> live actors holding that model
_POOL: dict[tuple[Any, ...], list[Any]] = {}


class ModelWorker:
    """One model, loaded from its spec in this worker, that runs shards of sweeps.

    ``__init__`` never raises: an error loading the model is kept and returned by
    :meth:`ready`, so the driver can raise it (a MechscopeError keeps its type and message).
    """

    def __init__(self, spec: str, fingerprint: str, device: str, threads: int) -> None:
        self.model: Any = None
        self.error: BaseException | None = None
        try:
            import torch

            torch.set_num_threads(max(1, threads))
            from mechscope.models import load
            from mechscope.models.loading import fingerprint as fp
            from mechscope.models.loading import quiet_loading

            with quiet_loading():
                model = load(spec, device=None if device == "cpu" else device)
            got = fp(model)
            if got != fingerprint:
                raise InputError(
                    f"the model a Ray worker loaded from spec {spec!r} differs from yours "
                    f"(fingerprint {got} vs {fingerprint}): workers load the model from its "
                    "spec, so weights changed in memory are not seen there. Save the model to "
                    "a folder and load that path, or use backend='local'"
                )
            self.model = model
        except BaseException as exc:  # noqa: BLE001  (reported by ready())
            self.error = exc

    def ready(self) -> tuple[int, tuple[str, str, bool] | None]:
        """This worker's pid, and its loading error as (class name, message, is_mechscope)."""
        e = self.error
        return os.getpid(), None if e is None else (type(e).__name__, str(e),
                                                    isinstance(e, MechscopeError))

    def run(self, fn: Callable[..., Any], shard: list[Any], kwargs: dict[str, Any]) -> Any:
        if self.error is not None:
            raise self.error
        return fn(self.model, shard, **kwargs)


_REMOTE: list[Any] = []


def _remote_worker() -> Any:
    """The Ray actor class of :class:`ModelWorker` (Ray itself never restarts or retries: the
    driver loop does, so it can tell a dead worker from a failing shard)."""
    if not _REMOTE:
        _REMOTE.append(ray.remote(max_restarts=0, max_task_retries=0)(ModelWorker))
    return _REMOTE[0]


def _cluster(backend: Backend) -> None:
    if ray.is_initialized():
        return
    if backend.address:
        _reachable(backend.address)
        try:
            ray.init(address=backend.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"cannot connect to the Ray cluster at {backend.address!r}: {exc}. "
                             "Start one with `ray start --head` and pass the address it prints, "
                             "or leave --address out for a local cluster") from exc  # fmt: skip
        return
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, _node_ip_address="127.0.0.1")  # fmt: skip


def _reachable(address: str) -> None:
    """Refuse an address nothing listens on within seconds (Ray itself retries for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    fix = ("start a cluster with `ray start --head` and pass the address it prints (HOST:6379, "
           "or ray://HOST:10001), or leave --address out for a local cluster")
    if not host or not port.isdigit():
        raise InputError(f"the Ray address {address!r} is not HOST:PORT or ray://HOST:PORT; {fix}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise InputError(f"nothing answers at the Ray address {address!r} "
                         f"({exc.strerror or exc}); {fix}") from None


def _spec(model: Model) -> tuple[str, str]:
    from mechscope.models.loading import fingerprint, spec_of

    spec = spec_of(model)
    if spec is None:
        raise InputError("backend='ray' loads the model from its spec in every worker, and this "
                         "model was not loaded with mechscope.models.load (it has no spec); "
                         "load it with load(spec), or use backend='local'")  # fmt: skip
    return spec, fingerprint(model)


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


def _user_error(exc: BaseException) -> MechscopeError | None:
    """The MechscopeError inside a task error (bad input: raised, never retried)."""
    cause = getattr(exc, "cause", exc)
    return cause if isinstance(cause, MechscopeError) else None


def shutdown_pool() -> None:
    for actors in _POOL.values():
        for a in actors:
            ray.kill(a, no_restart=True)
    _POOL.clear()


def run_on_ray(model: Model, fn: Callable[..., Any], shards: Sequence[list[Any]],
               kwargs: dict[str, Any], backend: Backend, stats: SweepStats, bar: Any,
               desc: str, emit: Callable[[int, Any], None]) -> None:  # fmt: skip
    """Run the shards on actors; hand each result to ``emit`` in shard order."""
    spec, fingerprint = _spec(model)
    _cluster(backend)
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    device = backend.device or ("cuda" if gpus else "cpu")
    n_workers = default_workers(len(shards), gpus if device != "cpu" else 0.0, cpus, backend.workers)
    share = max(1, int(cpus) // n_workers)  # the CPUs each actor reserves
    threads = backend.threads or (torch.get_num_threads() if device == "cpu" else share)
    key = (ray.get_runtime_context().get_job_id(), spec, fingerprint, device, threads, share)
    for other in [k for k in _POOL if k != key]:  # another model's actors hold resources
        actors = _POOL.pop(other)
        if other[0] == key[0]:  # (an earlier cluster's are gone already)
            for a in actors:
                ray.kill(a, no_restart=True)
    pool = _POOL.setdefault(key, [])
    options = {"num_gpus": 1, "num_cpus": 0} if device != "cpu" else {"num_cpus": share}

    def start() -> Any:
        actor = _remote_worker().options(**options).remote(spec, fingerprint, device, threads)
        pool.append(actor)
        return actor

    def retire(actor: Any) -> None:
        if actor in pool:
            pool.remove(actor)
        ray.kill(actor, no_restart=True)

    while len(pool) < n_workers:
        start()
    workers = list(pool[:n_workers])
    _check_ready(workers, retire)
    stats.workers = len(workers)

    results: dict[int, Any] = {}  # finished, not yet emitted (waiting for an earlier shard)
    finished: set[int] = set()
    next_out = 0
    attempts = [0] * len(shards)
    errors: dict[int, str] = {}
    queue = deque(range(len(shards)))
    idle = deque(workers)
    running: dict[Any, tuple[int, Any]] = {}
    try:
        while queue or running:
            while queue and idle:
                i, actor = queue.popleft(), idle.popleft()
                attempts[i] += 1
                running[actor.run.remote(fn, shards[i], kwargs)] = (i, actor)
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                i, actor = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the function raised
                    user = _user_error(exc)
                    if user is not None:
                        raise user from None
                    errors[i] = _error_text(exc)
                    idle.append(actor)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError) as exc:  # the worker died
                    stats.worker_deaths += 1
                    errors[i] = f"worker died: {_error_text(exc)}"
                    retire(actor)
                    fresh = start()
                    _check_ready([fresh], retire)
                    idle.append(fresh)
                else:
                    finished.add(i)
                    idle.append(actor)
                    bar.update(len(shards[i]))
                    while next_out in results:
                        emit(next_out, results.pop(next_out))
                        next_out += 1
                    continue
                if attempts[i] <= backend.retries:
                    stats.retried.append(i)
                    queue.append(i)  # to the next free worker: the replacement, or another
            bar.set_postfix(workers=len(workers), retried=len(stats.retried), refresh=False)
    except BaseException:  # Ctrl-C or bad input: stop the shards still running
        for _, actor in running.values():
            retire(actor)
        raise
    stats.attempts = sum(attempts)
    failed = [i for i in range(len(shards)) if i not in finished]
    if failed:
        starts = [sum(len(s) for s in shards[:i]) for i in range(len(shards))]
        raise SweepIncomplete(desc, [ShardFailure(i, starts[i], len(shards[i]), attempts[i], errors[i])
                                     for i in failed], results, len(shards))  # fmt: skip


def _check_ready(actors: list[Any], retire: Callable[[Any], None]) -> None:
    """Wait for actors to load their model; raise the first loading error."""
    refs = [a.ready.remote() for a in actors]
    _, waiting = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT)
    if waiting:
        for a in actors:
            retire(a)
        free = ray.available_resources()
        raise MechscopeError(f"{len(waiting)} of {len(actors)} Ray workers did not start within "
                             f"{START_TIMEOUT:.0f} s (the cluster has {free.get('CPU', 0):g} CPUs "
                             f"and {free.get('GPU', 0):g} GPUs free); ask for fewer workers, or "
                             "free the cluster")  # fmt: skip
    try:
        out = ray.get(refs)
    except ray.exceptions.RayError as exc:
        for a in actors:
            retire(a)
        raise MechscopeError(f"a Ray worker could not start: {_error_text(exc)}") from exc
    for _, error in out:
        if error is not None:
            for a in actors:
                retire(a)
            name, message, ours = error
            if ours:  # rebuild mechscope's own error (its classes take one message)
                import mechscope.errors as errors

                cls = getattr(errors, name, MechscopeError)
                try:
                    raise cls(message)
                except TypeError:
                    raise MechscopeError(message) from None
            raise MechscopeError(f"a Ray worker could not load the model: {name}: {message}")
