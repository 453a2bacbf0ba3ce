"""The ``mechscope`` command line: each verb is a thin wrapper over a public function.

Every verb takes ``--json``, which prints exactly one JSON object on stdout; progress and logs go
to stderr. Errors (bad input, and usage errors such as an unknown verb or option) print one line
to stderr (``error: ...``) and exit with status 2; ``mechscope`` or ``mechscope zoo`` alone
print their help and exit with status 2. Ctrl-C prints ``interrupted`` and exits with status 130
(a run being written to the store is marked failed, with nothing half-written).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors click
from typer.main import get_command

from mechscope import cli_scale as sweep
from mechscope.cli_app import app_cmd
from mechscope.cli_circuits import circuits_app
from mechscope.cli_heads import heads_app
from mechscope.cli_report import report_cmd
from mechscope.errors import MechscopeError, StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="mechscope: a mechanistic-interpretability workbench.")
zoo_app = typer.Typer(no_args_is_help=True, help="The zoo of small models with known mechanisms.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(heads_app, name="heads")
app.add_typer(circuits_app, name="circuits")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
StoreOpt = Annotated[Path, typer.Option("--store", help="Store directory.")]
DEFAULT_STORE = Path("mechscope-store")


def _emit(obj: Any, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
    else:
        sys.stdout.write(human.rstrip() + "\n")


def _clip(text: str, n: int = 72) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None or text.strip() == "":
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MechscopeError(f"--{what} takes comma-separated integers, got {text!r}") from None


@app.command()
def models(as_json: JsonFlag = False) -> None:
    """List what can be loaded here, with shapes."""
    from mechscope.models import list_models

    infos = [i.to_dict() for i in list_models()]
    lines = [f"{'spec':28} {'avail':5} {'L':>3} {'H':>3} {'KV':>3} {'d_head':>6} {'d_model':>7}  description"]
    for i in infos:
        lines.append(f"{i['spec']:28} {'yes' if i['available'] else 'no':5} {i['n_layers'] or '':>3} "
                     f"{i['n_heads'] or '':>3} {i['n_kv_heads'] or '':>3} {i['d_head'] or '':>6} "
                     f"{i['d_model'] or '':>7}  {i['description']}"
                     + ("" if i["available"] else f"  [install: {i['install']}]"))
    _emit({"models": infos}, as_json, "\n".join(lines))


@app.command("trace")
def trace_cmd(
    spec: Annotated[str, typer.Argument(help="Model spec: smollm2, minilm, zoo:NAME, native:..., a path.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Prompt text (repeatable).")] = None,
    tokens: Annotated[list[str] | None, typer.Option(
        "--tokens", help="Token ids, comma-separated (repeatable; for models without a tokenizer).")] = None,
    sites: Annotated[str, typer.Option(help="Comma-separated sites.")] = "heads,patterns",
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default all).")] = None,
    heads: Annotated[str | None, typer.Option(help="Comma-separated heads (default all).")] = None,
    positions: Annotated[str | None, typer.Option(help="Positions to keep, e.g. -1 (default all).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    out: Annotated[Path | None, typer.Option("--out", help="Save the trace to this new folder.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts-file", help="More prompts: a text file, one prompt per line (blank lines skipped).")] = None,
    backend: sweep.BackendOpt = None,
    address: sweep.AddressOpt = None,
    workers: sweep.WorkersOpt = None,
    shard_size: sweep.ShardOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Trace prompts: print the predicted next token and the captured sites with shapes."""
    from mechscope.models import load
    from mechscope.probes import TraceConfig, parse_sites, trace

    config = TraceConfig(sites=parse_sites(sites), layers=_ints(layers, "layers"),
                         heads=_ints(heads, "heads"), positions=_ints(positions, "positions"),
                         dtype=dtype)
    if out is not None and out.exists():
        raise MechscopeError(f"--out {out} exists; choose a new folder")
    texts = list(prompt or []) + (sweep.read_prompts(prompts_file) if prompts_file is not None else [])
    if texts and tokens:
        raise MechscopeError("give text prompts (--prompt/--prompts-file) or --tokens IDS, not both")
    if not texts and not tokens:
        raise MechscopeError("give either --prompt TEXT (repeatable), --prompts-file FILE (one "
                             "per line) or --tokens IDS (repeatable)")  # fmt: skip
    inputs: list[Any] = texts if texts else [list(_ints(t, "tokens") or ()) for t in tokens or []]
    labels = texts if texts else list(tokens or [])
    b = sweep.backend_of(backend, address, workers, shard_size)
    model = load(spec)
    tr = trace(model, inputs, config, out_dir=out, backend=b)
    if out is not None:
        from mechscope.probes import open_trace

        tr = open_trace(out)
    tok = model.tokenizer
    preds = []
    for i, p in enumerate(labels):
        t = int(tr.top_tokens[i, 0])
        preds.append({"prompt": p, "n_tokens": int(tr.lengths[i]), "next_token_id": t,
                      "next_token": tok.decode([t]) if tok is not None else None,
                      "p": float(tr.top_logprobs[i, 0].exp())})
    shapes = tr.shapes()
    result = {"model": spec, "predictions": preds, "sites": list(config.sites), "shapes": shapes,
              "dtype": dtype, "out": str(out) if out else None}
    human = "\n".join(
        [f"{_clip(str(p['prompt']))!r} -> "
         + (repr(p["next_token"]) if p["next_token"] is not None else f"token {p['next_token_id']}")
         + f" (p={p['p']:.3f})" for p in preds]
        + [f"  {k:16} {v}" for k, v in shapes.items()]
        + ([f"saved to {out}"] if out else [])
    )
    _emit(result, as_json, human)


def _patch_tokens(model: Any, text: str | None, ids: str | None, which: str) -> list[int]:
    if (text is None) == (ids is None):
        raise MechscopeError(f"give either --{which} TEXT or --{which}-tokens IDS (exactly one)")
    if ids is not None:
        return list(_ints(ids, f"{which}-tokens") or ())
    if model.tokenizer is None:
        raise MechscopeError(f"this model has no tokenizer, so --{which} TEXT cannot be read; "
                             f"pass token ids with --{which}-tokens 1,2,3")
    from mechscope.probes.tokens import tokenize

    assert text is not None
    tokens, _ = tokenize(model, [text])
    return [int(t) for t in tokens[0]]


def _single_token(model: Any, text: str, what: str) -> int:
    from mechscope.tasks._text import single_token

    if model.tokenizer is None:
        try:
            return int(text)
        except ValueError:
            raise MechscopeError(f"this model has no tokenizer: give --{what} as a token id") from None
    tok = single_token(model.tokenizer, text)
    if tok is None:
        raise MechscopeError(f"--{what} {text!r} is not a single token; pass one token (often "
                             "with a leading space, e.g. ' Mary')")
    return tok


@app.command("patch")
def patch_cmd(
    spec: Annotated[str, typer.Argument(help="Model spec: smollm2, zoo:NAME, native:..., a path.")],
    clean: Annotated[str | None, typer.Option("--clean", help="Clean prompt text.")] = None,
    corrupt: Annotated[str | None, typer.Option("--corrupt", help="Corrupt prompt text.")] = None,
    clean_tokens: Annotated[str | None, typer.Option(
        "--clean-tokens", help="Clean token ids, comma-separated (models without a tokenizer).")] = None,
    corrupt_tokens: Annotated[str | None, typer.Option(
        "--corrupt-tokens", help="Corrupt token ids, comma-separated.")] = None,
    site: Annotated[str, typer.Option(help="resid_pre, resid_mid, attn_out, mlp_out or heads.")] = "resid_pre",
    by: Annotated[str, typer.Option(help="position or all.")] = "position",
    direction: Annotated[str, typer.Option(help="denoise (clean into corrupt) or noise.")] = "denoise",
    answer: Annotated[str | None, typer.Option(
        help="The clean answer (one token; default: the clean run's top-1).")] = None,
    wrong: Annotated[str | None, typer.Option(
        help="The corrupt answer (one token; default: the corrupt run's top-1).")] = None,
    method: Annotated[str, typer.Option(help="exact (patch_sweep) or attribution (estimate).")] = "exact",
    task: Annotated[str | None, typer.Option("--task", help="Instead of one pair, a task's pairs: a "
                                             "zoo model's own task; ioi, induction or retrieval_text "
                                             "on a text model.")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="With --task: pairs drawn.")] = None,
    seed: Annotated[int | None, typer.Option(help="With --task: the generator's seed (default 0).")] = None,
    backend: sweep.BackendOpt = None,
    address: sweep.AddressOpt = None,
    workers: sweep.WorkersOpt = None,
    shard_size: sweep.ShardOpt = None,
    store: Annotated[Path | None, typer.Option("--store", help="Save the result in this store.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Activation patching of one clean/corrupt pair or a task's pairs (exact, or attribution)."""
    import torch

    from mechscope.models import load
    from mechscope.tasks.base import TaskBatch

    if method not in ("exact", "attribution"):
        raise MechscopeError(f"--method must be exact or attribution, got {method!r}")
    given = [o for o, v in (("--clean", clean), ("--corrupt", corrupt), ("--clean-tokens", clean_tokens),
                           ("--corrupt-tokens", corrupt_tokens), ("--answer", answer),
                           ("--wrong", wrong)) if v is not None]  # fmt: skip
    if task is not None and given:
        raise MechscopeError(f"--task NAME brings its own pairs and answers; drop {', '.join(given)} "
                             "(or drop --task to patch one pair)")  # fmt: skip
    if task is None and (n is not None or seed is not None):
        raise MechscopeError("--n and --seed go with --task NAME (the pairs drawn)")
    b = sweep.backend_of(backend, address, workers, shard_size)
    if method == "attribution" and b.sharded:
        raise MechscopeError("--method attribution runs in one process (one backward pass); drop "
                             "--backend ray/--shard-size, or use --method exact to sweep")  # fmt: skip
    model = load(spec)
    if task is not None:
        batch = sweep.task_pairs(model, task, n, seed or 0)
        return _patch_finish(spec, model, batch, task, site, by, direction, method, b, store, as_json)
    ids_c = _patch_tokens(model, clean, clean_tokens, "clean")
    ids_k = _patch_tokens(model, corrupt, corrupt_tokens, "corrupt")
    if len(ids_c) != len(ids_k):
        raise MechscopeError(f"clean has {len(ids_c)} tokens but corrupt has {len(ids_k)}; "
                             "patching needs equal lengths: reword one prompt (or pass token ids)")
    if not ids_c:
        raise MechscopeError("empty prompts: give at least one token")
    pair_ids = torch.tensor([ids_c]), torch.tensor([ids_k])
    if answer is None or wrong is None:
        from mechscope.probes import Tracer

        with Tracer(model, sites=("resid_pre",), layers=(0,), batch_size=1) as tracer:
            tops = [int(tracer.forward(t)[0][0, -1].argmax()) for t in pair_ids]
    a = _single_token(model, answer, "answer") if answer is not None else tops[0]
    w = _single_token(model, wrong, "wrong") if wrong is not None else tops[1]
    if a == w:
        raise MechscopeError(f"the answer and the wrong answer are the same token ({a}): the "
                             "corruption doesn't change the prediction; pass --answer/--wrong")
    batch = TaskBatch(task="cli", clean=pair_ids[0], corrupt=pair_ids[1], answer=torch.tensor([a]),
                      corrupt_answer=torch.tensor([w]), answer_pos=torch.tensor([len(ids_c) - 1]), seed=0)
    _patch_finish(spec, model, batch, None, site, by, direction, method, b, store, as_json, (a, w))


def _patch_finish(spec: str, model: Any, batch: Any, task: str | None, site: str, by: str, direction: str,
                  method: str, b: Any, store: Path | None, as_json: bool,
                  answers: tuple[int, int] | None = None) -> None:  # fmt: skip
    from mechscope.attribution import patch_sweep
    from mechscope.attribution.attrib_patch import attribution_patch, scores_payload
    n_pairs = int(batch.clean.shape[0])
    if method == "exact":
        config = {"site": site, "by": by, "direction": direction, "task": task, "n_pairs": n_pairs,
                  **sweep.backend_config(b)}  # fmt: skip
        with sweep.recording_failure(store, "patch_sweep", model, config):
            result = patch_sweep(model, batch, site=site, by=by, direction=direction, backend=b,
                                 progress=task is not None and not as_json and sys.stderr.isatty())  # fmt: skip
    else:
        result = attribution_patch(model, batch, site=site, by=by, direction=direction)
    a, w = answers or (None, None)
    obj = {**scores_payload(result), "by": by, "task": task, "n_pairs": n_pairs, "answer": a,
           "wrong": w, "run_id": None}  # fmt: skip
    if store is not None:
        from mechscope.store import Store

        obj["run_id"] = result.save(Store(store))
    frame = result.to_frame()
    top = frame.reindex(frame["score"].abs().sort_values(ascending=False).index).head(10)
    on = f" on task {task} ({n_pairs} pairs)" if task else ""
    human = "\n".join(
        [f"{method} {site} {direction} by {by}{on}: metric clean {result.metric_clean:.3f}, "
         f"corrupt {result.metric_corrupt:.3f}; {result.n_skipped} of {result.n_patches} skipped"]
        + [top.to_string(index=False, float_format=lambda x: f"{x:.3f}")]
        + ([f"run {obj['run_id']} saved to {store}"] if store is not None else []))
    _emit(obj, as_json, human)


def _span(text: str) -> tuple[int, int]:
    parts = text.replace(",", ":").split(":")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        raise MechscopeError(f"--subject-span takes START:END token positions (end exclusive), "
                             f"e.g. 1:3; got {text!r}") from None
    return start, end


app.command("causal-trace")(sweep.causal_trace_cmd)


def _usable_store_dir(path: Path) -> bool:
    """True when ``mechscope demo --store path`` can write there: a writable folder, or a missing
    one whose nearest existing parent is a writable folder."""
    probe = path.expanduser().absolute()
    if probe.exists():
        return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
    while not probe.exists():
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _new_store_folder(store: Path) -> Path | None:
    """``store`` itself, or a folder beside it or here, that a store can be made in."""
    candidates = [store, store.parent / "mechscope-store", Path("mechscope-store")]
    return next((c for c in candidates if _usable_store_dir(c)), None)


def _new_store_command(store: Path) -> str | None:
    """A ``mechscope demo`` command that makes a store and would succeed here, or None."""
    from mechscope.models.smollm2 import smollm2_available

    folder = _new_store_folder(store)
    if folder is None:
        return None
    model = "" if smollm2_available() else " --model zoo:induction"  # the default needs a package
    return f"mechscope demo --store {shlex.quote(str(folder))}{model}"


def _no_store_error(store: Path) -> StoreError:
    if store.exists() and not store.is_dir():
        problem = f"{store} is a file, not a store; a store is a folder"
    elif not store.exists():
        problem = f"{store} does not exist, so it is not a mechscope store"
    else:
        problem = f"{store} is not a mechscope store (no store.db in it)"
    command = _new_store_command(store)
    fix = (f"make one with `{command}`" if command else
           "give `mechscope demo --store DIR` a folder you can write to")
    return StoreError(f"{problem}; {fix}")


@app.command()
def runs(store: StoreOpt = DEFAULT_STORE, as_json: JsonFlag = False) -> None:
    """List stored runs (read-only: nothing in the store is written)."""
    from mechscope.store import Store

    if not (store / "store.db").is_file():
        raise _no_store_error(store)
    s = Store(store, readonly=True)
    records = s.runs()
    items = [{**r.to_dict(), "results": s.result_names(r.id) if r.status == "complete" else {}}
             for r in records]
    human = "\n".join(
        [f"{'id':26} {'kind':8} {'status':9} {'model':10} results"]
        + [f"{r['id']:26} {r['kind']:8} {r['status']:9} {str(r['model_spec']):10} "
           f"{', '.join(r['results'])}" for r in items]
    ) if items else f"no runs in {store}"
    _emit({"store": str(store), "runs": items}, as_json, human)


@app.command()
def demo(
    model: Annotated[str, typer.Option("--model", help="Model spec.")] = "smollm2",
    store: StoreOpt = DEFAULT_STORE,
    attribution: Annotated[bool, typer.Option(
        "--attribution/--no-attribution",
        help="Run causal tracing and activation patching (about a minute on SmolLM2 on a CPU).")] = True,
    heads: Annotated[bool, typer.Option(
        "--heads/--no-heads",
        help="Run the head analyses: attention sinks, retrieval heads, head divergence, head "
             "statistics (previous-token, duplicate-token, induction scores).")] = True,
    circuits: Annotated[bool, typer.Option(
        "--circuits/--no-circuits",
        help="Run discrete-SAE circuit discovery and score it against the baselines (about "
             "4 minutes on SmolLM2 on 2 cores, most of it exact head patching).")] = True,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Where to write the run's HTML report (default: "
                         "STORE/reports/RUN_ID.html).")] = None,
    write_report: Annotated[bool, typer.Option(
        "--write-report/--no-report", help="Write the HTML report at the end.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """The main job: every analysis on one model -> a run in the store, and its HTML report."""
    from mechscope.demo import DemoConfig, run_demo

    if store.exists() and not store.is_dir():
        folder = _new_store_folder(store)
        raise StoreError(f"--store {store} is a file; a store is a folder. Give a new folder"
                         + (f", e.g. --store {shlex.quote(str(folder))}" if folder else ""))

    if report is not None and report.is_dir():
        raise MechscopeError(f"--report {report} is a folder; give the report file's path, "
                             f"e.g. --report {shlex.quote(str(report / 'report.html'))}")
    summary = run_demo(DemoConfig(model=model, attribution=attribution, heads=heads,
                                  circuits=circuits, report=write_report), store, report=report)
    lines = [f"run {summary['run_id']} saved to {summary['store']}"]
    lines += [f"  {_clip(r['prompt'])!r} -> {r['top1']!r} (p={r['p_top1']:.3f})"
              for r in summary["predictions"]]
    ct, pa = summary.get("causal_trace"), summary.get("patching")
    if ct and "skipped" in ct:
        lines.append(f"  causal trace: skipped ({ct['skipped']})")
    elif ct:
        pk = ct["peak"]
        lines.append(f"  causal trace ({ct['kind']}, {ct['samples']} samples) p({ct['target']!r}): "
                     f"clean {ct['p_clean']:.3f}, corrupt {ct['p_corrupt']:.3f}; peak IE "
                     f"{pk['indirect_effect']:.3f} at layer {pk['layer']}, token {pk['token']!r}")
    if pa:
        pk = pa["peak"]
        lines.append(f"  patching {pa['site']} ({pa['task']}, {pa['answer']!r} vs {pa['wrong']!r}): "
                     f"p clean {pa['p_clean']:.3f}, corrupt {pa['p_corrupt']:.3f}; peak "
                     f"{pk['score']:.3f} at layer {pk['layer']}, token {pk['token']!r}")
    for name, h in (summary.get("heads") or {}).items():
        if name == "circuit_evaluation" and "methods" in h:
            aucs = ", ".join(f"{m} " + ("n/a" if v.get("roc_auc") is None else f"{v['roc_auc']:.3f}")
                             for m, v in h["methods"].items())
            lines.append(f"  circuit_evaluation (ROC-AUC vs {h['reference'].split(' (')[0]}): {aucs}")
            continue
        lines.append(f"  {name}: " + (f"skipped ({h['skipped']})" if "skipped" in h else
                                      f"heads {h.get('heads', [])[:8]}"))
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    lines.append(f"open the dashboard: mechscope app --store {shlex.quote(str(store))}")
    human = "\n".join(lines)
    _emit(summary, as_json, human)


@zoo_app.command("list")
def zoo_list(as_json: JsonFlag = False) -> None:
    """List the zoo's checkpoints with task accuracy and circuit heads."""
    from mechscope.models.zoo import list_zoo

    cards = [{"spec": f"zoo:{c.name}", "name": c.name, "task": c.task, "description": c.description,
              "accuracy": c.accuracy, "circuit_heads": [list(h) for h in c.circuit_heads],
              "config": c.config} for c in list_zoo()]
    human = "\n".join(f"zoo:{c['name']:14} acc={c['accuracy']:.3f} heads={c['circuit_heads']}  "
                      f"{c['description']}" for c in cards) or "no zoo checkpoints shipped"
    _emit({"zoo": cards}, as_json, human)


@zoo_app.command("train")
def zoo_train(
    name: Annotated[str, typer.Argument(help="Recipe name (see `mechscope zoo list`).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder to write NAME/ into (default: the user cache folder, "
                      "$MECHSCOPE_CACHE/zoo). Never the package's shipped checkpoints.")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Override the recipe's steps (quick checks).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Reproduce a zoo checkpoint from its recipe (the shipped one is left as it is)."""
    from mechscope.models.zoo import train_zoo

    card = train_zoo(name, out_dir=out, steps=steps, progress=True)
    folder = str(card.directory)
    obj = {"name": card.name, "accuracy": card.accuracy,
           "circuit_heads": [list(h) for h in card.circuit_heads], "out": folder}
    _emit(obj, as_json, f"trained zoo:{card.name} into {folder}: accuracy {card.accuracy:.3f}, "
                        f"circuit heads {obj['circuit_heads']}\n"
                        f"load it by its path: `mechscope trace {shlex.quote(folder)} --tokens 1,2,3`")


@app.command("discover")
def discover_cmd(
    spec: Annotated[Path, typer.Argument(help="The pipeline's TOML file (see examples/discover/).")],
    store: Annotated[Path | None, typer.Option(
        "--store", help="Store directory (default: the spec's output.store, else mechscope-store).")] = None,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Report path (default: the spec's output.report, else "
                         "STORE/reports/RUN_ID.html).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Scripted circuit discovery: the model, task, analyses and thresholds of SPEC.toml, end to
    end into one run and a self-contained HTML report."""
    from mechscope.discover import load_spec, run_discover

    parsed = load_spec(spec)
    root = store if store is not None else Path(parsed.store)
    if root.exists() and not root.is_dir():
        raise StoreError(f"the store {root} is a file; a store is a folder (set --store)")
    if report is not None and report.is_dir():
        raise MechscopeError(f"--report {report} is a folder; give the report file's path")
    summary = run_discover(parsed, store_dir=root, report=report)
    lines = [f"run {summary['run_id']} saved to {summary['store']}"]
    for name, s in summary["analyses"].items():
        lines.append(f"  {name}: " + (f"skipped ({s['skipped']})" if "skipped" in s else
                                      f"heads {s.get('heads', [])[:8]}" if "heads" in s else "done"))
    if summary["circuit"]:
        lines.append(f"circuit ({summary['circuit']['method']}): heads {summary['circuit']['heads']}")
    lines.append(f"report: {summary['report']}")
    lines.append(f"open the dashboard: mechscope app --store {shlex.quote(str(root))}")
    _emit(summary, as_json, "\n".join(lines))


heads_app.command("stats")(sweep.head_stats_cmd)
app.command("report")(report_cmd)
app.command("app")(app_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app. Mechscope errors and usage errors print one line and exit with
    status 2; Ctrl-C prints ``interrupted`` and exits with status 130."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    args = sys.argv[1:] if argv is None else list(argv)
    command = get_command(app)
    try:
        # click's own main() would turn Ctrl-C into a return value; drive the command directly.
        with command.make_context("mechscope", args) as ctx:
            command.invoke(ctx)
    except typer.Exit as exc:  # --help
        if exc.exit_code:
            sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:  # `mechscope`, `mechscope zoo`: the help, as an error
        text = exc.format_message().rstrip()  # typer's rich help prints itself and returns ""
        if text:
            sys.stderr.write(text + "\n")
        sys.exit(2)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "mechscope"
        message = " ".join(exc.format_message().split())
        sys.stderr.write(f"error: {message} (see `{where} --help`)\n")
        sys.exit(2)
    except MechscopeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # `mechscope ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)


if __name__ == "__main__":
    main()
