"""Sweeps on the command line: the sweep options and the verbs that sweep many items.

``--backend local|ray``, ``--address ADDR`` (a running Ray cluster; implies ``--backend ray``),
``--workers N`` and ``--shard-size N`` become one :class:`mechscope.scale.Backend`
(:func:`backend_of`); ``mechscope trace``, ``patch``, ``causal-trace`` and ``heads stats`` take
them. The same ``--shard-size`` gives the same numbers, bit for bit, on every backend.

A sweep whose shards still fail after their retries (:class:`~mechscope.scale.SweepIncomplete`)
prints one line and exits with status 2; with ``--store``, the store also holds a failed run
whose error is that report (:func:`recording_failure`), never a partial result.

Here too: ``causal-trace`` (one prompt, or many facts with ``--facts``) and ``heads stats``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.errors import InputError, MechscopeError

PANEL = "Sweep (local or Ray)"
BackendOpt = Annotated[str | None, typer.Option(
    "--backend", show_default=False, rich_help_panel=PANEL,
    help="Where the sweep runs: local (this process, the default) or ray.")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", rich_help_panel=PANEL,
    help="A running Ray cluster (ray://HOST:10001 or HOST:6379); implies --backend ray. "
         "Without it, --backend ray starts a local cluster.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, rich_help_panel=PANEL,
    help="Ray workers (default: one per GPU, else one per CPU).")]
ShardOpt = Annotated[int | None, typer.Option(
    "--shard-size", min=1, rich_help_panel=PANEL,
    help="Items per shard (default: the sweep's own). The same shard size gives the same "
         "numbers on every backend.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
StoreOpt = Annotated[Path | None, typer.Option("--store", help="Save the result in this store.")]


def backend_of(backend: str | None, address: str | None, workers: int | None,
               shard_size: int | None) -> Any:  # fmt: skip
    """The :class:`~mechscope.scale.Backend` the sweep options name.

    >>> backend_of(None, None, None, 4)
    Backend(kind='local', address=None, workers=None, retries=2, shard_size=4, device=None, threads=None)
    >>> backend_of(None, "ray://head:10001", 2, None).kind
    'ray'
    """
    from mechscope.scale import BACKENDS, Backend

    kind = (backend or ("ray" if address else "local")).strip().lower()
    if kind not in BACKENDS:
        raise InputError(f"--backend must be local or ray, got {backend!r}")
    if kind == "local" and address is not None:
        raise InputError(f"--address {address} names a Ray cluster, but --backend is local; "
                         "drop --backend local (--address implies --backend ray)")  # fmt: skip
    if kind == "local" and workers is not None:
        raise InputError("--workers sets the number of Ray workers; add --backend ray "
                         "(or drop --workers)")  # fmt: skip
    return Backend(kind=kind, address=address, workers=workers, shard_size=shard_size)


def backend_config(b: Any) -> dict[str, Any]:
    """What a run records of its backend (none of it changes the numbers, but the shard size)."""
    return {"backend": b.kind, "address": b.address, "workers": b.workers,
            "shard_size": b.shard_size}  # fmt: skip


@contextmanager
def recording_failure(store: Path | None, kind: str, model: Any,
                      config: Mapping[str, Any]) -> Iterator[None]:  # fmt: skip
    """Let a :class:`~mechscope.scale.SweepIncomplete` through; with ``store``, first record it
    there as a failed run of ``kind`` whose error is the failure report (and name the run)."""
    from mechscope.scale import SweepIncomplete, record_incomplete

    try:
        yield
    except SweepIncomplete as exc:
        if store is not None:
            from mechscope.store import Store

            run_id = record_incomplete(Store(store), kind, exc, model=model, config=config)
            exc.args = (f"{exc} (recorded as failed run {run_id} in {store})",)
        raise


def read_prompts(path: Path) -> list[str]:
    """The prompts of ``--prompts-file``: one per line, blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--prompts-file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise InputError(f"--prompts-file {path} cannot be read as text ({exc.__class__.__name__})"
                         "; give a UTF-8 file with one prompt per line") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise InputError(f"--prompts-file {path} has no prompts; write one prompt per line")
    return prompts


def task_pairs(model: Any, task: str, n: int | None, seed: int) -> Any:
    """``patch --task``: the TaskBatch of ``task`` for this model (a zoo model's own pairs; on
    a text model ioi, induction or retrieval_text; on a model without a tokenizer, induction)."""
    from mechscope.circuits.sae import TEXT_TASKS, task_batch
    from mechscope.models.loading import spec_of
    from mechscope.tasks import TASKS

    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(sorted(TASKS))}")
    if (spec_of(model) or "").startswith("zoo:") or (model.tokenizer is not None and task in TEXT_TASKS):
        try:
            return task_batch(model, task, n, seed)
        except InputError as exc:  # its hint "(or no --task)" means the SAE's default task
            raise InputError(str(exc).replace(" (or no --task)", "")) from exc
    if model.tokenizer is not None:
        raise InputError(f"--task {task} has no built-in pairs for a text model; choose one of "
                         f"{', '.join(TEXT_TASKS)}")  # fmt: skip
    if task != "induction":
        raise InputError(f"this model has no tokenizer, so --task {task} cannot be worded for it; "
                         "use --task induction (random token ids), or a zoo model "
                         "(`mechscope zoo list`), or a pair with --clean-tokens/--corrupt-tokens")  # fmt: skip
    from mechscope.tasks import induction

    seq_len = max(3, min(20, (int(model.cfg.n_ctx) - 2) // 2))
    return induction(n or 32, seq_len=seq_len, d_vocab=int(model.cfg.d_vocab), seed=seed)


# -- causal-trace --------------------------------------------------------------------------------


def trace_payload(result: Any) -> dict[str, Any]:
    """The JSON-ready summary of a causal trace (what ``mechscope causal-trace --json`` prints)."""
    layer, pos = result.argmax()
    return {
        "scores": result.scores.tolist(), "indirect_effect": result.indirect_effect.tolist(),
        "tokens": list(result.tokens), "token_ids": list(result.token_ids),
        "subject": list(result.subject), "target": result.target,
        "target_token": result.target_token, "p_clean": result.p_clean,
        "p_corrupt": result.p_corrupt, "total_effect": result.total_effect,
        "kind": result.trace_kind, "severed": result.severed, "window": result.window,
        "samples": result.samples, "noise": result.noise, "sigma": result.sigma,
        "n_skipped": result.n_skipped,
        "peak": {"layer": layer, "pos": pos, "token": result.tokens[pos],
                 "indirect_effect": float(result.indirect_effect[layer, pos])},
    }  # fmt: skip


def _fact(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object like "
                         '{"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower"}')  # fmt: skip
    missing = [k for k in ("prompt", "subject") if k not in obj]
    if missing:
        raise InputError(f"{where}: no {' or '.join(repr(k) for k in missing)}; a fact needs "
                         '"prompt" and "subject" (and may give "target")')  # fmt: skip
    prompt, subject, target = obj["prompt"], obj["subject"], obj.get("target")
    ids = isinstance(prompt, list) and bool(prompt) and all(type(t) is int for t in prompt)
    if not (ids or (isinstance(prompt, str) and prompt.strip())):
        raise InputError(f"{where}: \"prompt\" must be text or a list of token ids, got {prompt!r}")
    span = isinstance(subject, list) and len(subject) == 2 and all(type(t) is int for t in subject)
    if not (span or (isinstance(subject, str) and subject.strip())):
        raise InputError(f"{where}: \"subject\" must be text (a piece of the prompt) or "
                         f"[START, END] token positions, got {subject!r}")  # fmt: skip
    if ids and span and not 0 <= subject[0] < subject[1] <= len(prompt):
        raise InputError(f"{where}: the subject span {subject} is not inside the prompt's "
                         f"{len(prompt)} tokens (0 <= START < END <= {len(prompt)})")  # fmt: skip
    if isinstance(prompt, str) and isinstance(subject, str) and subject not in prompt:
        raise InputError(f"{where}: the subject {subject!r} is not in the prompt {prompt!r}")
    if not (target is None or type(target) is int or (isinstance(target, str) and target)):
        raise InputError(f"{where}: \"target\" must be one token's text or id, got {target!r}")
    return {"prompt": prompt, "subject": tuple(subject) if span else subject, "target": target}


def read_facts(source: str, n: int | None) -> list[dict[str, Any]]:
    """``--facts``: ``known`` (ROME's known facts for SmolLM2, target None: the model's top-1)
    or a JSONL file of ``{"prompt", "subject", "target"?}``; the first ``n``."""
    if source == "known":
        from mechscope.data import known_facts

        facts = [{"prompt": f["prompt"], "subject": f["subject"], "target": None}
                 for f in known_facts("smollm2")]  # fmt: skip
        return facts[:n]
    path = Path(source)
    if path.is_dir():
        raise InputError(f"--facts {source} is a folder; give a JSONL file in it, or `known`")
    if not path.is_file():
        raise InputError(f"--facts {source}: no such file; give a JSONL file (one "
                         '{"prompt": ..., "subject": ..., "target": ...} per line) or `known`')  # fmt: skip
    facts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--facts {source} line {number} is not JSON ({exc.msg}); "
                                 "write one JSON object per line") from None  # fmt: skip
            facts.append({**_fact(obj, f"--facts {source} line {number}"), "line": number})
            if n is not None and len(facts) == n:
                break
    if not facts:
        raise InputError(f"--facts {source} has no facts; write one JSON object per line")
    return facts


def _span_hint(exc: InputError, facts: bool) -> InputError:
    """The library's hints name its arguments; name the options (or the JSONL field)."""
    fix = '"subject": [START, END]' if facts else "--subject-span START:END"
    return InputError(str(exc).replace("a (start, end) token span", fix)
                      .replace("a (start, end) span", fix))  # fmt: skip


def _aggregate_payload(agg: Any) -> dict[str, Any]:
    scores = [[None if v != v else float(v) for v in row] for row in agg.scores.double().tolist()]
    return {"buckets": list(agg.buckets), "counts": list(agg.counts), "scores": scores,
            "kind": agg.trace_kind, "n_prompts": agg.n_prompts, "total_effect": agg.total_effect}  # fmt: skip


def _many(spec: str, model: Any, facts: list[dict[str, Any]], source: str, b: Any, options: dict[str, Any],
          store: Path | None, as_json: bool, top: int) -> None:  # fmt: skip
    from mechscope.attribution import causal_traces
    from mechscope.cli import _clip, _emit

    if model.tokenizer is None and any(isinstance(f["prompt"], str) for f in facts):
        raise InputError("this model has no tokenizer, so the facts' text cannot be read; give "
                         'token ids: {"prompt": [1, 2, 3], "subject": [START, END]} (or use a '
                         "model with a tokenizer)")  # fmt: skip
    config = {**options, "facts": source, "n_facts": len(facts), **backend_config(b)}
    with recording_failure(store, "causal_trace_sweep", model, config):
        try:
            sweep = causal_traces(model, [{k: f[k] for k in ("prompt", "subject", "target")} for f in facts],
                                  **options, backend=b, progress=not as_json and sys.stderr.isatty())  # fmt: skip
        except InputError as exc:
            raise _span_hint(exc, facts=True) from exc
    agg = sweep.aggregate
    per = [{"line": f.get("line"), "prompt": f["prompt"],
            "subject_text": f["subject"] if isinstance(f["subject"], str) else None,
            **trace_payload(r)} for f, r in zip(facts, sweep.traces, strict=True)]  # fmt: skip
    obj = {"model": spec, "facts": source, "n_facts": len(per), "traces": per,
           "aggregate": _aggregate_payload(agg), **options, "run_id": None}  # fmt: skip
    if store is not None:
        from mechscope.store import Store

        obj["run_id"] = sweep.save(Store(store))
    lines = [f"causal traces of {len(per)} fact{'s' * (len(per) != 1)} ({options['kind']}, {options['samples']} samples, "
             f"noise {options['noise']:g}): mean total effect {agg.total_effect:.4f}",
             "average indirect effect by subject/token bucket (peak layer):",
             f"  {'bucket':22} {'facts':>5} {'layer':>5} {'IE':>8}"]  # fmt: skip
    for i, name in enumerate(agg.buckets):
        row = agg.scores[i]
        if agg.counts[i] and bool((row == row).any()):
            layer = int(row.nan_to_num(float("-inf")).argmax())
            lines.append(f"  {name:22} {agg.counts[i]:>5} {layer:>5} {float(row[layer]):>8.4f}")
        else:
            lines.append(f"  {name:22} {0:>5} {'-':>5} {'-':>8}")
    shown = f"first {top} of {len(per)} facts (--json for all)" if len(per) > top else "per fact"
    lines.append(f"{shown}: p(target) clean -> corrupt, total effect, peak (layer, token):")
    for i, p in enumerate(per[:top]):
        where = f"line {p['line']}" if p["line"] is not None else f"fact {i + 1}"
        prompt = p["prompt"] if isinstance(p["prompt"], str) else " ".join(p["tokens"])
        pk = p["peak"]
        lines.append(f"  {where:9} {_clip(prompt, 40)!r} -> {p['target_token']!r}: {p['p_clean']:.3f} -> "
                     f"{p['p_corrupt']:.3f}, TE {p['total_effect']:.3f}, peak L{pk['layer']} "
                     f"{pk['token']!r} {pk['indirect_effect']:.3f}")  # fmt: skip
    if store is not None:
        lines.append(f"run {obj['run_id']} saved to {store}")
    _emit(obj, as_json, "\n".join(lines))


def causal_trace_cmd(
    spec: Annotated[str, typer.Argument(help="Model spec: smollm2, zoo:NAME, native:..., a path.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_tokens: Annotated[str | None, typer.Option(
        "--prompt-tokens", help="Prompt token ids, comma-separated (models without a tokenizer).")] = None,
    subject: Annotated[str | None, typer.Option(
        "--subject", help="The subject: a piece of the prompt's text, e.g. 'The Eiffel Tower'.")] = None,
    subject_span: Annotated[str | None, typer.Option(
        "--subject-span", help="The subject as token positions START:END (end exclusive).")] = None,
    target: Annotated[str | None, typer.Option(
        help="The answer (one token; an id for models without a tokenizer; default: the clean "
             "run's top-1).")] = None,
    facts: Annotated[str | None, typer.Option(
        "--facts", help='Many facts instead of one prompt: a JSONL file, one {"prompt": ..., '
                        '"subject": ..., "target": ...} per line (target optional; token ids and '
                        "[START, END] spans for models without a tokenizer), or `known` (ROME's "
                        "known facts for SmolLM2).")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="With --facts: the first N facts.")] = None,
    kind: Annotated[str, typer.Option(help="hidden, mlp or attn: what is restored.")] = "hidden",
    samples: Annotated[int, typer.Option(min=1, help="Noisy runs averaged (ROME: 10).")] = 10,
    noise: Annotated[float, typer.Option(min=0.0, help="Noise level in embedding stds (ROME: 3).")] = 3.0,
    window: Annotated[int, typer.Option(
        min=1, help="Layers restored together for mlp/attn (ROME: 10).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    severed: Annotated[str | None, typer.Option(
        help="mlp or attn: freeze those outputs above the restored layer (kind hidden only).")] = None,
    top: Annotated[int, typer.Option(
        min=1, help="Cells shown in the table (with --facts: facts listed).")] = 10,
    backend: BackendOpt = None,
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    shard_size: ShardOpt = None,
    store: StoreOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """ROME causal tracing of one prompt, or of many facts (--facts) and their average.

    Each (layer, token) is restored into runs whose subject embeddings were noised."""
    from mechscope.attribution import causal_trace
    from mechscope.cli import _emit, _ints, _single_token, _span
    from mechscope.models import load

    if kind not in ("hidden", "mlp", "attn"):
        raise MechscopeError(f"--kind must be hidden, mlp or attn, got {kind!r}")
    if severed is not None and severed not in ("mlp", "attn"):
        raise MechscopeError(f"--severed must be mlp or attn, got {severed!r}")
    if severed is not None and kind != "hidden":
        raise MechscopeError(f"--severed {severed} works with --kind hidden only (got --kind {kind})")
    options: dict[str, Any] = {"kind": kind, "window": window, "samples": samples, "noise": noise, "seed": seed,
               "severed": severed}  # fmt: skip
    if facts is not None:
        one = [o for o, v in (("--prompt", prompt), ("--prompt-tokens", prompt_tokens),
                              ("--subject", subject), ("--subject-span", subject_span),
                              ("--target", target)) if v is not None]  # fmt: skip
        if one:
            raise MechscopeError(f"--facts gives each fact's prompt, subject and target; drop "
                                 f"{', '.join(one)} (or drop --facts to trace one prompt)")  # fmt: skip
        b = backend_of(backend, address, workers, shard_size)
        the_facts = read_facts(facts, n)
        _many(spec, load(spec), the_facts, facts, b, options, store, as_json, top)
        return
    if n is not None:
        raise MechscopeError("--n N goes with --facts (the first N facts)")
    sweep = [o for o, v in (("--backend", backend), ("--address", address), ("--workers", workers),
                            ("--shard-size", shard_size)) if v is not None]  # fmt: skip
    if sweep:
        raise MechscopeError(f"{', '.join(sweep)}: the sweep options trace many facts; add "
                             f"--facts FILE.jsonl (or drop {', '.join(sweep)} to trace one prompt)")  # fmt: skip
    if (prompt is None) == (prompt_tokens is None):
        raise MechscopeError("give either --prompt TEXT or --prompt-tokens IDS (exactly one), "
                             "or --facts FILE.jsonl for many")  # fmt: skip
    if (subject is None) == (subject_span is None):
        raise MechscopeError("give either --subject TEXT or --subject-span START:END (exactly one)")
    if prompt is not None and not prompt.strip():
        raise MechscopeError("the prompt is empty; give it some text")
    ids = None if prompt_tokens is None else list(_ints(prompt_tokens, "prompt-tokens") or ())
    if ids is not None and not ids:
        raise MechscopeError("--prompt-tokens is empty: give at least one token id")
    span = None if subject_span is None else _span(subject_span)
    model = load(spec)
    if model.tokenizer is None and prompt is not None:
        raise MechscopeError("this model has no tokenizer, so --prompt TEXT cannot be read; pass "
                             "token ids with --prompt-tokens 1,2,3 and --subject-span START:END")
    if model.tokenizer is None and subject is not None:
        raise MechscopeError("this model has no tokenizer, so --subject TEXT cannot be found; "
                             "pass --subject-span START:END")
    tgt = None if target is None else _single_token(model, target, "target")
    the_prompt: str | list[int] = ids if ids is not None else prompt or ""
    the_subject: str | tuple[int, int] = span if span is not None else subject or ""
    try:
        result = causal_trace(model, the_prompt, the_subject, target=tgt, **options,
                              progress=not as_json and sys.stderr.isatty())  # fmt: skip
    except InputError as exc:
        raise _span_hint(exc, facts=False) from exc
    obj = {"model": spec, **trace_payload(result), "seed": seed, "run_id": None}
    if store is not None:
        from mechscope.store import Store

        obj["run_id"] = result.save(Store(store))
    frame = result.to_frame()
    cells = frame.sort_values("indirect_effect", ascending=False).head(top)
    sev = f", {severed} severed" if severed else ""
    human = "\n".join(
        [f"causal trace ({kind}{sev}, {samples} samples, noise {noise:g}): "
         f"p({result.target_token!r}) clean {result.p_clean:.4f}, corrupt {result.p_corrupt:.4f}, "
         f"total effect {result.total_effect:.4f}",
         f"top {len(cells)} cells by indirect effect (* = subject token):"]
        + [cells[["layer", "pos", "token", "indirect_effect"]].to_string(
            index=False, float_format=lambda x: f"{x:.4f}")]
        + ([f"run {obj['run_id']} saved to {store}"] if store is not None else []))
    _emit(obj, as_json, human)


# -- heads stats ---------------------------------------------------------------------------------


def head_stats_cmd(
    spec: Annotated[str, typer.Argument(help="Model spec: smollm2, minilm, zoo:NAME, native:..., a path.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Prompt text (repeatable).")] = None,
    tokens: Annotated[list[str] | None, typer.Option(
        "--tokens", help="Token ids, comma-separated (repeatable; for models without a tokenizer).")] = None,
    task: Annotated[str | None, typer.Option(
        "--task", help="induction: [BOS] + R + R rows (the default without prompts).")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Rows drawn from the task (default 16).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the task generator.")] = 0,
    top: Annotated[int, typer.Option(min=1, help="Heads shown per kind.")] = 5,
    backend: BackendOpt = None,
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    shard_size: ShardOpt = None,
    store: StoreOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Previous-token, duplicate-token, induction and sink scores of every head.

    The scores of TransformerLens's head detector (sink: ACT's share of attention on sink keys)."""
    from mechscope.circuits.head_stats import default_run, head_statistics
    from mechscope.cli import _emit
    from mechscope.cli_heads import _inputs, _load

    prompts = _inputs(prompt, tokens, task)
    if task not in (None, "induction"):
        raise MechscopeError(f"head statistics run on --task induction or on --prompt/--tokens; "
                             f"got --task {task}")  # fmt: skip
    if n is not None and prompts:
        raise MechscopeError("--n N goes with --task induction (rows drawn), not with prompts")
    b = backend_of(backend, address, workers, shard_size)
    model = _load(spec, prompts)
    config = {"task": task, "n": n, "seed": seed, "prompts": prompts, **backend_config(b)}
    with recording_failure(store, "head_statistics", model, config):
        progress = not as_json and sys.stderr.isatty()
        result = (head_statistics(model, prompts, progress=progress, backend=b) if prompts else  # token ids too
                  default_run(model, task=task, n=n, seed=seed, backend=b, progress=progress))  # fmt: skip
    obj = {"model": spec, "analysis": "stats", **result.payload(), "run_id": None}
    if store is not None:
        from mechscope.store import Store

        obj["run_id"] = result.save(Store(store))
    lines = [f"head statistics over {obj['n_prompts']} prompt{'s' * (obj['n_prompts'] != 1)}, top {top} heads per kind "
             f"({obj['error_measure']} score; sink: share of attention on sink keys):"]  # fmt: skip
    for kind, grid in obj["by_kind"].items():
        ranked = sorted(((v, li, hi) for li, row in enumerate(grid) for hi, v in enumerate(row)
                         if v is not None), key=lambda t: -t[0])[:top]  # fmt: skip
        lines.append(f"  {kind:16} " + "  ".join(f"L{li}H{hi} {v:.3f}" for v, li, hi in ranked))
    if store is not None:
        lines.append(f"run {obj['run_id']} saved to {store}")
    _emit(obj, as_json, "\n".join(lines))


__all__ = ["backend_of", "causal_trace_cmd", "head_stats_cmd", "read_facts", "read_prompts",
           "recording_failure", "task_pairs", "trace_payload"]  # fmt: skip
