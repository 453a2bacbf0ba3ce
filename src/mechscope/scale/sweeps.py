"""The sharded forms of the sweeps: tracing many prompts, head statistics over many prompts,
patching over many prompt pairs (causal tracing over many facts is
:func:`mechscope.attribution.causal_traces`).

Each public analysis (:func:`mechscope.probes.trace`, :func:`mechscope.circuits.head_statistics`,
:func:`mechscope.attribution.patch_sweep`) calls the function here when given a ``backend``
other than the default; each shard runs that same analysis (with the local backend) on its
items, and the merge here puts the pieces together in order:

- tracing and head statistics: shards are whole batches of the unsharded run (the same rows
  in the same forwards: head statistics in its length-sorted order), so the merged result
  equals the unsharded local one bit for bit, on any backend and any shard size.
- patching: a sweep's score is a mean over its pairs, so shards of ``shard_size`` pairs (default
  :data:`PATCH_SHARD`) each give their mean raw metric grid, and the merge averages them
  weighted by rows, then normalises. The numbers depend on the shard plan only (not on the
  backend or workers): the same ``shard_size`` gives the same bits on every backend; one
  shard is the unsharded sweep exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.scale import Backend, as_backend, map_shards, plan, round_up
from mechscope.types import Model

#: default pairs per shard of a sharded patching sweep
PATCH_SHARD = 32
#: default batches per shard of a sharded trace or head-statistics sweep
BATCHES_PER_SHARD = 4


def _rows(tokens: Tensor, lengths: Tensor, idx: Sequence[int]) -> list[list[int]]:
    return [tokens[i, : int(lengths[i])].tolist() for i in idx]


def _shard_size(backend: Backend, batch_size: int) -> int:
    """Items per shard: whole batches (``Backend.shard_size`` rounded up to a multiple)."""
    return round_up(backend.shard_size or BATCHES_PER_SHARD * batch_size, batch_size)


# -- tracing -------------------------------------------------------------------------------------


def trace_shard(model: Model, rows: list[list[int]], *, config: Any) -> Any:
    """One shard of :func:`trace_sweep`: the local tracer on these token rows."""
    from mechscope.probes.tracer import Tracer

    with Tracer(model, config) as tracer:
        return tracer.run(rows, progress=False)


def trace_sweep(model: Model, prompts: Any, config: Any, *, backend: str | Backend,
                out_dir: str | Path | None = None, progress: bool = True,
                corrupt: bool = False) -> Any:  # fmt: skip
    """:func:`mechscope.probes.trace` over shards of whole batches (see the module docstring);
    with ``out_dir``, the shards are written in order as they arrive, one file per shard."""
    from mechscope.probes import budget
    from mechscope.probes.trace import TraceWriter, concat_traces, open_trace
    from mechscope.probes.tracer import TraceConfig, Tracer, tokenize

    config = config or TraceConfig()
    b = as_backend(backend)
    tokens, lengths = tokenize(model, prompts, corrupt=corrupt)
    with Tracer(model, config) as tracer:  # the whole run's size, checked before any forward
        est = tracer._estimate(tokens, lengths, streamed=out_dir is not None)
        meta = tracer._meta()
    budget.check(est, budget.max_bytes(config.max_bytes), longest=int(lengths.max()))
    shards = plan(_rows(tokens, lengths, range(len(lengths))), _shard_size(b, config.batch_size))
    if out_dir is None:
        parts, _ = map_shards(model, trace_shard, shards, backend=b, kwargs={"config": config},
                              desc="trace", progress=progress)  # fmt: skip
        return concat_traces(parts)
    with TraceWriter(out_dir, meta=meta) as writer:  # shards written in order as they arrive
        map_shards(model, trace_shard, shards, backend=b, kwargs={"config": config}, desc="trace",
                   progress=progress, on_result=lambda _, part: writer.write(part))  # fmt: skip
    return open_trace(out_dir)


# -- head statistics -----------------------------------------------------------------------------


def head_stats_shard(model: Model, rows: list[list[int]], **options: Any) -> Any:
    """One shard of :func:`head_statistics_sweep`: the local analysis on these rows (sorted by
    length already, so its batches are the unsharded run's)."""
    from mechscope.circuits.head_stats import head_statistics

    return head_statistics(model, rows, progress=False, **options)


def head_statistics_sweep(model: Model, tokens: Tensor, lengths: Tensor, *,
                          backend: str | Backend, progress: bool, provenance: Any,
                          **options: Any) -> Any:  # fmt: skip
    """:func:`mechscope.circuits.head_statistics` over shards of its length-sorted batches."""
    from mechscope.circuits.head_stats import HeadStatistics

    b = as_backend(backend)
    order = torch.argsort(lengths, stable=True).tolist()
    index = plan(order, _shard_size(b, int(options["batch_size"])))
    shards = [_rows(tokens, lengths, idx) for idx in index]
    parts, _ = map_shards(model, head_stats_shard, shards, backend=b, kwargs=options,
                          desc="head statistics", progress=progress)  # fmt: skip
    kinds = list(parts[0].per_prompt)
    per = {k: torch.zeros(len(lengths), *parts[0].per_prompt[k].shape[1:]) for k in kinds}
    for idx, part in zip(index, parts, strict=True):
        for k in kinds:
            per[k][torch.tensor(idx)] = part.per_prompt[k]
    first = parts[0]
    return HeadStatistics(
        provenance=provenance, scores={k: v.mean(0) for k, v in per.items()}, per_prompt=per,
        lengths=lengths, error_measure=first.error_measure, exclude_bos=first.exclude_bos,
        exclude_current_token=first.exclude_current_token,
        target_rows_only=first.target_rows_only)  # fmt: skip


# -- patching ------------------------------------------------------------------------------------


def _task_rows(task: Any, idx: Sequence[int]) -> Any:
    sel = torch.tensor(list(idx))  # every shard keeps the task's width: one grid of positions
    return replace(task, clean=task.clean[sel], corrupt=task.corrupt[sel],
                   answer=task.answer[sel], corrupt_answer=task.corrupt_answer[sel],
                   answer_pos=task.answer_pos[sel], lengths=task.real_lengths[sel])  # fmt: skip


def patch_shard(model: Model, idx: list[int], *, task: Any, options: dict[str, Any]) -> Any:
    """One shard of :func:`patch_sweep_sharded`: the local sweep on these rows of the task."""
    from mechscope.attribution.patching import patch_sweep

    return patch_sweep(model, _task_rows(task, idx), progress=False, **options)


def patch_sweep_sharded(model: Model, task: Any, *, backend: str | Backend, progress: bool,
                        **options: Any) -> Any:  # fmt: skip
    """:func:`mechscope.attribution.patch_sweep` over shards of the task's pairs, merged as the
    row-weighted mean of each shard's raw metric grid (see the module docstring)."""
    from mechscope.attribution.result import PatchResult
    from mechscope.metrics import Direction, normalised_patching
    from mechscope.results import Provenance

    b = as_backend(backend)
    if options.get("metric") is not None:
        raise InputError("a sharded patching sweep merges the task's own metric (a mean over "
                         "pairs); a custom metric sees whole batches and cannot be split. Drop "
                         "metric=, or run it unsharded (backend='local', no shard_size)")  # fmt: skip
    n = task.batch_size
    index = plan(list(range(n)), b.shard_size or PATCH_SHARD)
    parts, _ = map_shards(model, patch_shard, index, backend=b,
                              kwargs={"task": task, "options": options},
                              desc=f"patch {options.get('site', 'resid_pre')}", progress=progress)
    if len(parts) == 1:
        return parts[0]
    sizes = [len(i) for i in index]
    first: PatchResult = parts[0]

    def mean(values: Sequence[float]) -> float:
        return sum(s * v for s, v in zip(sizes, values, strict=True)) / n

    raw = sum(s * (p.raw_scores if p.raw_scores is not None else p.scores).double()
              for s, p in zip(sizes, parts, strict=True))  # fmt: skip
    raw = (raw / n).float()
    m_clean = mean([p.metric_clean for p in parts])
    m_corrupt = mean([p.metric_corrupt for p in parts])
    direction = cast(Direction, first.direction)
    scores = torch.as_tensor(normalised_patching(raw, m_clean, m_corrupt, direction))
    work: dict[str, Any] = dict(first.work)
    for key in ("run", "skipped", "forwards", "rows", "token_layers"):
        work[key] = sum(int(p.work.get(key) or 0) for p in parts)
    naive = sum(float(p.work["token_layers"]) / float(p.work["flops_vs_naive"]) for p in parts)
    work["flops_vs_naive"] = work["token_layers"] / naive
    work["path"] = ",".join(sorted({str(p.work.get("path")) for p in parts}))
    diffs = [p.work.get("engine_max_logit_diff") for p in parts]
    work["engine_max_logit_diff"] = None if None in diffs else max(float(d) for d in diffs)  # type: ignore[arg-type]
    work["shards"] = len(parts)
    pc = [p.prob_clean for p in parts]
    pk = [p.prob_corrupt for p in parts]
    return PatchResult(
        provenance=Provenance.of(model, first.provenance.config), scores=scores, raw_scores=raw,
        axes=first.axes, tokens=first.tokens, site=first.site, direction=first.direction,
        metric=first.metric, normalised=True, metric_clean=m_clean, metric_corrupt=m_corrupt,
        n_patches=first.n_patches, n_skipped=min(p.n_skipped for p in parts),
        prob_clean=None if None in pc else mean(pc),  # type: ignore[arg-type]
        prob_corrupt=None if None in pk else mean(pk),  # type: ignore[arg-type]
        work=work)  # fmt: skip
