"""Scripted circuit discovery: a pipeline described in a TOML file, run end to end into one run
of the store and a self-contained HTML report (``mechscope discover SPEC.toml``).

A spec names the model, the task, the analyses to run (with their options) and how the circuit
is cut from a ranking. Every key is checked before the model is loaded or the store is touched;
an unknown key, analysis or option is an :class:`~mechscope.errors.InputError` that lists what is
allowed. Example (``examples/discover/zoo_ioi.toml``)::

    model = "zoo:ioi"            # any spec mechscope.models.load takes
    seed = 0
    analyses = ["sae", "evaluation", "sinks"]

    [task]                       # the minimal pairs of "sae" and "evaluation"
    name = "ioi"                 # default: a zoo model's own task; "ioi" on a text model
    n = 32

    [options.sae]                # SAEConfig fields
    epochs = 500
    [options.evaluation]         # evaluate_methods: which methods to score
    methods = ["sae", "patching", "attribution"]

    [circuit]                    # the circuit: the heads a ranking keeps
    method = "sae"               # "sae", an evaluation method, or a head analysis
    k = 4                        # the k best heads, and/or
    threshold = 0.0              # heads scoring at least this (both: the best k above it)

    [output]                     # both optional; the CLI's --store / --report win
    store = "mechscope-store"
    report = "reports/zoo_ioi.html"

Analyses (:data:`ANALYSES`): ``sae`` (:func:`mechscope.circuits.sae.default_run`),
``evaluation`` (:func:`mechscope.circuits.evaluate.evaluate_methods`: the SAE and the baselines
against the zoo truth, or exact head patching), ``causal_trace`` (needs ``prompt``, ``subject``,
optional ``target``, ``kinds`` of hidden / mlp / attn, ``samples``), and the head analyses
``sinks``, ``retrieval``, ``divergence``, ``streaming``, ``head_stats`` (each its module's
``default_run``; ``[options.NAME]`` are that function's keyword arguments). Each result is staged
in the run under its analysis name (``causal_trace_<kind>`` per kind), the circuit as
``circuit``; read them back with ``Result.load(store, run_id, name)``.
"""

from __future__ import annotations

import inspect
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mechscope.errors import InputError
from mechscope.types import Model

#: analysis name -> module under mechscope.circuits whose ``default_run`` it calls
HEAD_ANALYSES = {"sinks": "sinks", "retrieval": "retrieval", "divergence": "divergence",
                 "streaming": "streaming", "head_stats": "head_stats"}  # fmt: skip
ANALYSES = ("sae", "evaluation", "causal_trace", *HEAD_ANALYSES)
_TOP = {"model", "seed", "name", "analyses", "task", "options", "circuit", "output"}
_CIRCUIT = {"method", "k", "threshold", "by_abs", "edges"}
_TRACE_KEYS = {"prompt", "subject", "target", "kinds", "samples", "window", "noise"}
_EVAL_KEYS = {"methods"}


@dataclass(frozen=True, kw_only=True)
class DiscoverSpec:
    """A parsed, checked pipeline spec (see the module docstring for the file)."""

    model: str
    seed: int = 0
    name: str = ""
    analyses: tuple[str, ...] = ("sae", "evaluation")
    task: str | None = None
    n: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    circuit: dict[str, Any] = field(default_factory=lambda: {"method": "sae"})
    store: str = "mechscope-store"
    report: str | None = None
    source: str = ""


def _unknown(keys: Any, allowed: Any, where: str) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise InputError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"{where}: {what} must be {_what(kind)}, got {value!r}")
    return value


def _what(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        list: "a list", dict: "a table"}.get(k, k.__name__) for k in kinds)  # fmt: skip


def load_spec(path: str | Path) -> DiscoverSpec:
    """Read and check a spec file; nothing is loaded or written.

    Raises:
        InputError: a missing or unreadable file, invalid TOML (with its line), an unknown key,
            analysis or option, a value of the wrong type, or a circuit method that no listed
            analysis ranks heads by.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no spec file {p}" + (" (it is a folder)" if p.is_dir() else "")
                         + "; write one like examples/discover/zoo_ioi.toml")  # fmt: skip
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{p} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {p}: {exc}") from None
    return parse_spec(raw, source=str(p))


def parse_spec(raw: dict[str, Any], *, source: str = "the spec") -> DiscoverSpec:
    """Check a spec given as a dict (a parsed TOML file); see :func:`load_spec`."""
    _unknown(raw, _TOP, source)
    if "model" not in raw:
        raise InputError(f"{source}: `model` is required, e.g. model = \"zoo:ioi\" or \"smollm2\"")
    model = _typed(raw["model"], str, source, "model")
    seed = _typed(raw.get("seed", 0), int, source, "seed")
    analyses = tuple(_typed(raw.get("analyses", ["sae", "evaluation"]), list, source, "analyses"))
    if not analyses:
        raise InputError(f"{source}: `analyses` is empty; list some of {list(ANALYSES)}")
    for a in analyses:
        if a not in ANALYSES:
            raise InputError(f"{source}: unknown analysis {a!r}; known: {list(ANALYSES)}")
    if len(set(analyses)) != len(analyses):
        raise InputError(f"{source}: `analyses` lists an analysis twice: {list(analyses)}")
    task = _typed(raw.get("task", {}), dict, source, "[task]")
    _unknown(task, {"name", "n"}, f"{source} [task]")
    n = task.get("n")
    if n is not None and (_typed(n, int, source, "task.n") < 2):
        raise InputError(f"{source}: task.n must be at least 2 (pairs), got {n}")
    options = _typed(raw.get("options", {}), dict, source, "[options]")
    for a, opts in options.items():
        if a not in analyses:
            raise InputError(f"{source}: [options.{a}] is given but {a!r} is not in `analyses` "
                             f"{list(analyses)}")  # fmt: skip
        _typed(opts, dict, source, f"[options.{a}]")
        _check_options(a, opts, f"{source} [options.{a}]")
    if "causal_trace" in analyses and "prompt" not in options.get("causal_trace", {}):
        raise InputError(f"{source}: causal_trace needs [options.causal_trace] with `prompt` and "
                         "`subject` (text, or [start, end] token positions)")  # fmt: skip
    circuit = dict(_typed(raw.get("circuit", {}), dict, source, "[circuit]"))
    _unknown(circuit, _CIRCUIT, f"{source} [circuit]")
    _check_circuit(circuit, analyses, options, source)
    out = _typed(raw.get("output", {}), dict, source, "[output]")
    _unknown(out, {"store", "report"}, f"{source} [output]")
    return DiscoverSpec(
        model=model, seed=seed, name=str(raw.get("name", "")), analyses=analyses,
        task=_typed(task["name"], str, source, "task.name") if "name" in task else None, n=n,
        options={k: dict(v) for k, v in options.items()}, circuit=circuit,
        store=_typed(out.get("store", "mechscope-store"), str, source, "output.store"),
        report=_typed(out["report"], str, source, "output.report") if "report" in out else None,
        source=source,
    )  # fmt: skip


def _check_options(analysis: str, opts: dict[str, Any], where: str) -> None:
    if analysis == "sae":
        from mechscope.circuits.sae import SAEConfig

        _unknown(opts, {f.name for f in fields(SAEConfig)} - {"seed"}, where)
        SAEConfig(**opts)  # its own range checks
    elif analysis == "evaluation":
        from mechscope.circuits.evaluate import METHODS

        _unknown(opts, _EVAL_KEYS, where)
        for m in _typed(opts.get("methods", list(METHODS)), list, where, "methods"):
            if m not in METHODS:
                raise InputError(f"{where}: unknown method {m!r}; known: {list(METHODS)}")
    elif analysis == "causal_trace":
        _unknown(opts, _TRACE_KEYS, where)
        for kind in _typed(opts.get("kinds", ["hidden"]), list, where, "kinds"):
            if kind not in ("hidden", "mlp", "attn"):
                raise InputError(f"{where}: kinds are hidden, mlp and attn, not {kind!r}")
    else:
        import importlib

        fn = importlib.import_module(f"mechscope.circuits.{HEAD_ANALYSES[analysis]}").default_run
        allowed = set(inspect.signature(fn).parameters) - {"model", "seed", "progress"}
        _unknown(opts, allowed, where)


def _check_circuit(circuit: dict[str, Any], analyses: tuple[str, ...],
                   options: dict[str, Any], source: str) -> None:  # fmt: skip
    from mechscope.circuits.evaluate import METHODS

    ranked = [a for a in analyses if a in HEAD_ANALYSES or a == "sae"]
    if "evaluation" in analyses:
        ranked += list(options.get("evaluation", {}).get("methods", METHODS))
    rankers = set(ranked)
    if "method" not in circuit:  # default: the SAE, else the first listed ranking
        circuit["method"] = "sae" if "sae" in rankers else (ranked[0] if ranked else None)
    method = circuit["method"]
    if method is None:
        return  # no circuit: nothing ranks heads
    if method not in rankers:
        raise InputError(f"{source}: circuit.method {method!r} is not ranked by any listed "
                         f"analysis; pick one of {sorted(rankers)}")  # fmt: skip
    if "k" in circuit and _typed(circuit["k"], int, source, "circuit.k") < 1:
        raise InputError(f"{source}: circuit.k must be at least 1, got {circuit['k']}")
    if "threshold" in circuit:
        _typed(circuit["threshold"], (int, float), source, "circuit.threshold")
    if "by_abs" in circuit:
        _typed(circuit["by_abs"], bool, source, "circuit.by_abs")


def run_discover(spec: DiscoverSpec, *, store_dir: str | Path | None = None,
                 report: str | Path | None = None, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the pipeline into one run (kind ``discover``) and write its report.

    Returns a JSON-able summary: ``run_id``, ``store``, ``report``, ``model``, ``analyses``
    (name -> summary, or ``{"skipped": reason}`` for one that cannot run on the model),
    ``circuit`` (the kept heads and the method) and ``timings``.
    """
    from dataclasses import asdict

    from mechscope.models import load
    from mechscope.models.loading import resolve_spec
    from mechscope.report import write_report
    from mechscope.store import Store

    resolve_spec(spec.model)  # an unknown spec fails before the store is created
    root = Path(store_dir if store_dir is not None else spec.store)
    store = Store(root)
    t0 = time.perf_counter()
    model = load(spec.model)
    results: dict[str, Any] = {}
    out: dict[str, Any] = {}
    with store.run("discover", config=asdict(spec), model=model, seed=spec.seed) as run:
        run.time("load", time.perf_counter() - t0)
        for name in spec.analyses:
            t1 = time.perf_counter()
            try:
                staged = _run_one(name, model, spec, results, progress)
            except InputError as exc:
                out[name] = {"skipped": str(exc)}
                run.add_json(f"{name}_summary", out[name])
                continue
            for key, result in staged.items():
                results[key] = result
                summary = _summary(result)
                result.stage(run, key)
                run.add_json(f"{key}_summary", {**summary, "config": result.provenance.config})
                out[key] = summary
            run.time(name, time.perf_counter() - t1)
        circuit = _circuit(spec, results)
        if circuit is not None:
            circuit.stage(run, "circuit")
            out["circuit"] = {"method": circuit.method, "heads": [list(h) for h in circuit.heads]}
            run.add_json("circuit_summary", out["circuit"])
        run.time("total", time.perf_counter() - t0)
    out_path = Path(report) if report is not None else (
        Path(spec.report) if spec.report else root / "reports" / f"{run.id}.html")
    path = write_report(Store(root, readonly=True), run.id, out_path)
    return {"run_id": run.id, "store": str(root.resolve()), "report": str(path.resolve()),
            "model": spec.model, "analyses": {k: v for k, v in out.items() if k != "circuit"},
            "circuit": out.get("circuit"), "timings": run.timings}  # fmt: skip


def _summary(result: Any) -> dict[str, Any]:
    payload = result.payload() if hasattr(result, "payload") else {}
    return {k: v for k, v in payload.items() if k not in ("scores", "effect", "key_scores")}


def _run_one(name: str, model: Model, spec: DiscoverSpec, done: dict[str, Any],
             progress: bool) -> dict[str, Any]:  # fmt: skip
    """One analysis -> {staged name: Result}."""
    import importlib

    opts = spec.options.get(name, {})
    if name == "sae":
        from mechscope.circuits.sae import SAEConfig, default_run

        cfg = SAEConfig(**opts, seed=spec.seed)
        return {"sae": default_run(model, task=spec.task, n=spec.n, seed=spec.seed, config=cfg,
                                   progress=progress)}  # fmt: skip
    if name == "evaluation":
        from mechscope.circuits.evaluate import evaluate_methods
        from mechscope.circuits.sae import SAEConfig

        cfg = SAEConfig(**spec.options.get("sae", {}), seed=spec.seed)
        ev = evaluate_methods(model, task=spec.task, n=spec.n, seed=spec.seed, sae_config=cfg,
                              methods=opts.get("methods"), sae_result=done.get("sae"),
                              progress=progress)  # fmt: skip
        return {"evaluation": ev}
    if name == "causal_trace":
        from mechscope.attribution import causal_trace

        subject = opts["subject"]
        subject = tuple(subject) if isinstance(subject, list) else subject
        kw = {k: opts[k] for k in ("window", "noise", "samples") if k in opts}
        return {f"causal_trace_{kind}": causal_trace(
            model, opts["prompt"], subject, target=opts.get("target"), kind=kind,
            seed=spec.seed, progress=progress, **kw) for kind in opts.get("kinds", ["hidden"])}  # fmt: skip
    module = importlib.import_module(f"mechscope.circuits.{HEAD_ANALYSES[name]}")
    return {name: module.default_run(model, seed=spec.seed, progress=progress, **opts)}


def _circuit(spec: DiscoverSpec, results: dict[str, Any]) -> Any:
    """The circuit cut from ``circuit.method``'s ranking (None when nothing ranks heads)."""
    from mechscope.circuits.graph import Circuit

    c = spec.circuit
    method = c.get("method")
    if method is None:
        return None
    k, threshold, by_abs = c.get("k"), c.get("threshold"), bool(c.get("by_abs", False))
    if method == "sae" and "sae" in results:
        sae = results["sae"]
        return Circuit.from_scores(sae.node_scores, k=k, threshold=threshold, by_abs=by_abs,
                                   edge_scores=sae.edge_scores, max_edges=int(c.get("edges", 20)),
                                   method="discrete SAE", provenance=sae.provenance)  # fmt: skip
    source = results.get(method)
    scores = None if source is None else source.scores
    ev = results.get("evaluation")
    if source is None and ev is not None and method in [m.name for m in ev.methods]:
        source, scores = ev, ev.method(method).scores
    if source is None:
        return None  # the analysis that ranks by it was skipped on this model
    return Circuit.from_scores(scores, k=k, threshold=threshold, by_abs=by_abs, method=method,
                               provenance=source.provenance)  # fmt: skip


__all__ = ["ANALYSES", "DiscoverSpec", "load_spec", "parse_spec", "run_discover"]
