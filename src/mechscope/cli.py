"""The ``mechscope`` command line: each verb is a thin wrapper over a public function.

Every verb takes ``--json``, which prints exactly one JSON object on stdout; progress and logs go
to stderr. Errors print one line to stderr (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.errors import MechscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="mechscope: a mechanistic-interpretability workbench.")
zoo_app = typer.Typer(no_args_is_help=True, help="The zoo of small models with known mechanisms.")
app.add_typer(zoo_app, name="zoo")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
StoreOpt = Annotated[Path, typer.Option("--store", help="Store directory.")]
DEFAULT_STORE = Path("mechscope-store")


def _emit(obj: Any, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
    else:
        sys.stdout.write(human.rstrip() + "\n")


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
    as_json: JsonFlag = False,
) -> None:
    """Trace prompts: print the predicted next token and the captured sites with shapes."""
    from mechscope.models import load
    from mechscope.probes import TraceConfig, Tracer, parse_sites

    config = TraceConfig(sites=parse_sites(sites), layers=_ints(layers, "layers"),
                         heads=_ints(heads, "heads"), positions=_ints(positions, "positions"),
                         dtype=dtype)
    if out is not None and out.exists():
        raise MechscopeError(f"--out {out} exists; choose a new folder")
    if bool(prompt) == bool(tokens):
        raise MechscopeError("give either --prompt TEXT or --tokens IDS (one of them, repeatable)")
    inputs: list[Any] = list(prompt) if prompt else [list(_ints(t, "tokens") or ()) for t in tokens or []]
    labels = list(prompt) if prompt else list(tokens or [])
    model = load(spec)
    with Tracer(model, config) as tracer:
        tr = tracer.run(inputs, out_dir=out)
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
        [f"{p['prompt']!r} -> "
         + (repr(p["next_token"]) if p["next_token"] is not None else f"token {p['next_token_id']}")
         + f" (p={p['p']:.3f})" for p in preds]
        + [f"  {k:16} {v}" for k, v in shapes.items()]
        + ([f"saved to {out}"] if out else [])
    )
    _emit(result, as_json, human)


@app.command()
def runs(store: StoreOpt = DEFAULT_STORE, as_json: JsonFlag = False) -> None:
    """List stored runs."""
    from mechscope.errors import StoreError
    from mechscope.store import Store

    if not (store / "store.db").is_file():
        raise StoreError(f"{store} is not a mechscope store (no store.db); run `mechscope demo --store {store}`")
    s = Store(store)
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
    as_json: JsonFlag = False,
) -> None:
    """The main job: every analysis on one model -> a run in the store."""
    from mechscope.demo import DemoConfig, run_demo

    summary = run_demo(DemoConfig(model=model), store)
    human = "\n".join(
        [f"run {summary['run_id']} saved to {summary['store']}"]
        + [f"  {r['prompt']!r} -> {r['top1']!r} (p={r['p_top1']:.3f})" for r in summary["predictions"]]
    )
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
    out: Annotated[Path | None, typer.Option("--out", help="Folder (default: the package's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the recipe's steps (quick checks).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Reproduce a zoo checkpoint from its recipe."""
    from mechscope.models import zoo

    train_zoo = getattr(zoo, "train_zoo", None)
    if train_zoo is None:
        raise MechscopeError("this build of mechscope has no zoo training recipes")
    card = train_zoo(name, out_dir=out, steps=steps, progress=True)
    obj = {"name": card.name, "accuracy": card.accuracy,
           "circuit_heads": [list(h) for h in card.circuit_heads], "out": str(out or card.directory)}
    _emit(obj, as_json, f"trained zoo:{card.name}: accuracy {card.accuracy:.3f}, "
                        f"circuit heads {obj['circuit_heads']}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning mechscope errors into one line and exit status 2."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    try:
        app(args=argv, standalone_mode=False)
    except MechscopeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
