"""``mechscope heads retrieval|divergence|sinks``: thin wrappers over the head analyses.

Each verb loads the model, calls the analysis module's ``default_run`` (see
:mod:`mechscope.circuits`), and prints either a short table of the top heads or, with ``--json``,
one JSON object: ``model``, ``analysis``, the result's ``payload()`` (``scores``: the layer x head
grid; ``heads``: the selected heads as ``[layer, head]`` pairs; per-analysis fields) and ``run_id``
(with ``--store``). Prompts come from ``--prompt`` (repeatable; ``--tokens`` for models without a
tokenizer) or ``--task``; with neither, each analysis runs its built-in inputs for the model.
``heads stats`` (head statistics, with the sweep options) lives in :mod:`mechscope.cli_scale`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from mechscope.errors import MechscopeError

heads_app = typer.Typer(no_args_is_help=True,
                        help="Head analyses: retrieval heads, head divergence, attention sinks, "
                             "head statistics.")  # fmt: skip

SpecArg = Annotated[
    str, typer.Argument(help="Model spec: smollm2, minilm, zoo:NAME, native:..., a path.")
]
PromptOpt = Annotated[
    list[str] | None, typer.Option("--prompt", "-p", help="Prompt text (repeatable).")
]
TokensOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tokens", help="Token ids, comma-separated (repeatable; for models without a tokenizer)."
    ),
]
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="A task generator (mechscope.tasks.TASKS) for the prompts, e.g. retrieval_text.",
    ),
]
NOpt = Annotated[int | None, typer.Option("--n", min=1, help="Prompts drawn from the task.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the task generator.")]
TopOpt = Annotated[int, typer.Option(min=1, help="Heads shown in the table.")]
StoreOpt = Annotated[Path | None, typer.Option("--store", help="Save the result in this store.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


PathOpt = Annotated[
    str,
    typer.Option(
        "--path",
        help="How attention is read: auto (statistics without the query-by-key patterns when "
        "they would exceed the memory budget, $MECHSCOPE_MAX_BYTES), patterns, or stats.",
    ),
]


def _path_line(result: Any) -> list[str]:
    ap = result.payload().get("attention_path") or {}
    return [f"attention path: {ap['path']} ({ap['why']})"] if ap else []


def _inputs(prompt: list[str] | None, tokens: list[str] | None, task: str | None) -> Any:
    """The prompts as the analyses take them: texts, lists of token ids, or None (built-in)."""
    from mechscope.cli import _ints

    given = [x for x in (prompt, tokens) if x]
    if len(given) > 1:
        raise MechscopeError("give --prompt TEXT or --tokens IDS, not both")
    if task is not None and given:
        raise MechscopeError("give prompts (--prompt/--tokens) or --task NAME, not both")
    if task is not None:
        from mechscope.tasks import TASKS

        if task not in TASKS:
            raise MechscopeError(f"unknown task {task!r}; choose one of {', '.join(sorted(TASKS))}")
    if prompt:
        empty = [i for i, p in enumerate(prompt) if not p.strip()]
        if empty:
            raise MechscopeError(f"--prompt number {empty[0] + 1} is empty; give it some text")
        return list(prompt)
    if tokens:
        rows = [list(_ints(t, "tokens") or ()) for t in tokens]
        if any(not r for r in rows):
            raise MechscopeError("--tokens is empty: give at least one token id per prompt")
        return rows
    return None


def _load(spec: str, prompts: Any) -> Any:
    from mechscope.models import load

    model = load(spec)
    if model.tokenizer is None and prompts and isinstance(prompts[0], str):
        raise MechscopeError("this model has no tokenizer, so --prompt TEXT cannot be read; pass "
                             "token ids with --tokens 1,2,3 (or use --task)")  # fmt: skip
    return model


def _finish(spec: str, analysis: str, result: Any, store: Path | None, as_json: bool, top: int,
            title: str, extra: list[str] | None = None) -> None:  # fmt: skip
    from mechscope.cli import _emit

    obj = {"model": spec, "analysis": analysis, **result.payload(), "run_id": None}
    if store is not None:
        from mechscope.store import Store

        obj["run_id"] = result.save(Store(store))
    scores = obj["scores"]
    ranked = sorted(((v, li, hi) for li, row in enumerate(scores) for hi, v in enumerate(row)
                     if v is not None), reverse=True)[:top]  # fmt: skip
    selected = [list(h) for h in obj.get("heads", [])]
    lines = [title, f"top {len(ranked)} heads (* = selected):"]
    lines += [
        f"  L{li:<3} H{hi:<3} {v:9.4f}{' *' if [li, hi] in selected else ''}"
        for v, li, hi in ranked
    ]
    lines += extra or []
    if store is not None:
        lines.append(f"run {obj['run_id']} saved to {store}")
    _emit(obj, as_json, "\n".join(lines))


def _progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


@heads_app.command("retrieval")
def retrieval_cmd(
    spec: SpecArg,
    prompt: PromptOpt = None,
    tokens: TokensOpt = None,
    needle: Annotated[
        str | None,
        typer.Option(
            "--needle",
            help="With --prompt: the text inside each prompt the model must copy "
            "(with --tokens: its token ids).",
        ),
    ] = None,
    task: TaskOpt = None,
    n: NOpt = None,
    seed: SeedOpt = 0,
    top: TopOpt = 10,
    store: StoreOpt = None,
    as_json: JsonFlag = False,
    path: PathOpt = "auto",
) -> None:
    """Retrieval heads (Wu et al. 2024): each head's copy-paste score while the model decodes needles."""
    from mechscope.circuits.retrieval import default_run

    prompts = _inputs(prompt, tokens, task)
    if needle is not None and not prompts:
        raise MechscopeError("--needle goes with --prompt/--tokens: the text each prompt holds")
    model = _load(spec, prompts)
    the_needle: Any = needle
    if needle is not None and tokens:
        from mechscope.cli import _ints

        the_needle = list(_ints(needle, "needle") or ())
    result = default_run(model, prompts=prompts, needle=the_needle, task=task, n=n, seed=seed,
                         path=path, progress=_progress(as_json))  # fmt: skip
    p = result.payload()
    title = (
        f"retrieval scores: {p.get('n_answered')} of {p.get('n_trials')} trials answered; "
        f"{100 * float(p.get('share') or 0):.1f}% of heads score > {p.get('threshold', 0.1)}"
    )
    _finish(spec, "retrieval", result, store, as_json, top, title, _path_line(result))


@heads_app.command("divergence")
def divergence_cmd(
    spec: SpecArg,
    prompt: PromptOpt = None,
    tokens: TokensOpt = None,
    segment: Annotated[
        str | None,
        typer.Option(
            "--segment", help="With --prompt: the context segment (text inside each prompt)."
        ),
    ] = None,
    segment_span: Annotated[
        str | None,
        typer.Option(
            "--segment-span", help="The segment as token positions START:END (end exclusive)."
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="How the segment is removed: mask (attention to it), delete (the tokens) or filler."
        ),
    ] = "mask",
    task: TaskOpt = None,
    n: NOpt = None,
    seed: SeedOpt = 0,
    top: TopOpt = 10,
    store: StoreOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Head divergence (VHD): how much each head's output changes when a context segment is removed."""
    from mechscope.circuits.divergence import default_run

    if mode not in ("mask", "delete", "filler"):
        raise MechscopeError(f"--mode must be mask, delete or filler, got {mode!r}")
    prompts = _inputs(prompt, tokens, task)
    if prompts and segment is None and segment_span is None:
        raise MechscopeError("with --prompt/--tokens give the segment: --segment TEXT or "
                             "--segment-span START:END")  # fmt: skip
    if segment is not None and segment_span is not None:
        raise MechscopeError("give --segment TEXT or --segment-span START:END, not both")
    if (segment is not None or segment_span is not None) and not prompts:
        raise MechscopeError("--segment/--segment-span go with --prompt/--tokens")
    seg: Any = segment
    if segment_span is not None:
        from mechscope.cli import _span

        seg = _span(segment_span)
    model = _load(spec, prompts)
    result = default_run(model, prompts=prompts, segment=seg, mode=cast(Any, mode), task=task, n=n, seed=seed,
                         progress=_progress(as_json))  # fmt: skip
    _finish(
        spec,
        "divergence",
        result,
        store,
        as_json,
        top,
        f"head divergence (VHD, segment removed by {mode}):",
    )


@heads_app.command("sinks")
def sinks_cmd(
    spec: SpecArg,
    prompt: PromptOpt = None,
    tokens: TokensOpt = None,
    task: TaskOpt = None,
    n: NOpt = None,
    seed: SeedOpt = 0,
    top: TopOpt = 10,
    store: StoreOpt = None,
    as_json: JsonFlag = False,
    path: PathOpt = "auto",
) -> None:
    """Attention sinks (ACT): the keys that soak up attention, and each head's share absorbed by them."""
    from mechscope.circuits.sinks import default_run

    prompts = _inputs(prompt, tokens, task)
    model = _load(spec, prompts)
    result = default_run(
        model, prompts=prompts, task=task, n=n, seed=seed, path=path, progress=_progress(as_json)
    )
    p = result.payload()
    sinks = p.get("sinks", [])
    extra = [f"sink positions ({len(sinks)}; freq = share of prompt x layer x head):"]
    extra += [
        f"  pos {s['position']:<5} freq {s['frequency']:.3f}  tokens "
        + ", ".join(f"{t!r} x{c}" for t, c in list(s["tokens"].items())[:3])
        for s in sinks[:10]
    ] + _path_line(result)
    _finish(
        spec,
        "sinks",
        result,
        store,
        as_json,
        top,
        "share of each head's attention absorbed by its sink tokens:",
        extra,
    )


__all__ = ["heads_app"]
