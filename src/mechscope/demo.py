"""The main job: load a model, trace prompts, causal-trace a fact, patch a clean/corrupt pair,
and save everything as one run in the store.

Steps: the trace (predictions, head norms, attention patterns, shapes); ROME causal tracing
(:func:`~mechscope.attribution.causal_trace`, hidden states, few noise samples) of "The Eiffel
Tower is located in the city of" -> " Paris"; exact activation patching
(:func:`~mechscope.attribution.patch_sweep`, ``resid_pre`` by position) of one IOI pair. On a
model without a tokenizer (zoo, native) the last two use the first demo row: subject span
``(1, 3)`` (the corrupt row changes those tokens) and the clean top-1 as the answer.
Then the head analyses (:mod:`mechscope.circuits`), each on its built-in inputs for the model
(``default_run``): attention sinks, retrieval heads, head divergence and the head statistics
(previous-token, duplicate-token, induction scores of every head); then discrete-SAE
circuit discovery (:mod:`mechscope.circuits.sae`) on the model's built-in minimal pairs (IOI on
a text model, a zoo model's own task), and the circuit evaluation
(:func:`~mechscope.circuits.evaluate.evaluate_methods`): the SAE and the baselines scored against
the model's ground truth (a zoo model) or exact head patching (any other model). Each step is a
public function; the demo only chains them. Last, a self-contained HTML report of the run
(:mod:`mechscope.report`).

The run (kind ``demo``) holds: the table ``predictions``; JSON ``model``, ``trace_shapes`` and
``tokens`` (each prompt's tokens as text); tensors ``head_norms`` and ``patterns_prompt{i}``
(``layer{l}``: ``[head, query, key]``, each prompt's real tokens); every analysis as a
:class:`~mechscope.results.Result` staged under its step's name (``causal_trace``, ``patching``,
``sinks``, ``retrieval_heads``, ``head_divergence``, ``head_statistics``, ``sae_circuit``,
``circuit_evaluation``;
read with ``Result.load(store, run_id, name)``); and JSON ``{name}_summary`` for each step (a
step that cannot run on the model holds only ``{"skipped": reason}``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.store import RunWriter
from mechscope.types import Model

DEFAULT_MODEL = "smollm2"
DEFAULT_PROMPTS = (
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "one two three four five one two three four",
)
TRACE_PROMPT = ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs.

    ``attribution=False`` skips causal tracing and patching; ``heads=False`` skips the head
    analyses (sinks, retrieval heads, head divergence, head statistics); ``circuits=False``
    skips the SAE circuit and its evaluation (on SmolLM2 on 2 cores about 20 s, and 3.5
    minutes, most of it the exact head patching the evaluation scores against);
    ``report=False`` skips the HTML report. ``trace_samples``: the noisy runs of the causal
    trace (ROME uses 10; 3 keeps the demo quick). ``trace_prompt``: (prompt, subject, target)
    of the causal trace on a model with a tokenizer.
    """

    model: str = DEFAULT_MODEL
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    sites: tuple[str, ...] = ("heads", "patterns", "ffn", "resid")
    seed: int = 0
    attribution: bool = True
    heads: bool = True
    circuits: bool = True
    report: bool = True
    trace_samples: int = 3
    trace_prompt: tuple[str, str, str] = TRACE_PROMPT


def demo_inputs(model: Model, config: DemoConfig) -> Any:
    """The demo's prompts: ``config.prompts`` for a model with a tokenizer; for a zoo model the
    first rows of its own task's minimal pairs (a :class:`~mechscope.tasks.TaskBatch`, the pairs
    its ground truth was measured on); for a native model as many rows of random token ids,
    seeded by ``config.seed`` through a local generator (the global torch generator is left
    alone)."""
    if model.tokenizer is not None:
        return list(config.prompts)
    batch = _zoo_batch(model, config)
    if batch is not None:
        return batch
    gen = torch.Generator().manual_seed(config.seed)
    n = min(16, int(model.cfg.n_ctx))
    return torch.randint(1, int(model.cfg.d_vocab), (len(config.prompts), n), generator=gen)


def _zoo_batch(model: Model, config: DemoConfig) -> Any:
    """A zoo model's own minimal pairs (as many rows as ``config.prompts``), or None."""
    from mechscope.circuits.sae import task_batch
    from mechscope.models.loading import spec_of
    from mechscope.tasks.base import TaskBatch

    if not (spec_of(model) or "").startswith("zoo:"):
        return None
    b = task_batch(model, None, len(config.prompts), config.seed)
    k = min(len(config.prompts), b.batch_size)
    n = int(b.real_lengths[:k].max())
    return TaskBatch(task=b.task, clean=b.clean[:k, :n], corrupt=b.corrupt[:k, :n],
                     answer=b.answer[:k], corrupt_answer=b.corrupt_answer[:k],
                     answer_pos=b.answer_pos[:k], lengths=b.real_lengths[:k], seed=b.seed)


def run_demo(config: DemoConfig, store_dir: str | Path, *, progress: bool = True,
             report: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the demo and save it as one run; returns a JSON-able summary.

    Then (``config.report``) writes the run's HTML report to ``report`` (default
    ``<store>/reports/<run id>.html``); its path is the summary's ``report``.

    Timings (seconds): ``load`` (the model), ``trace``, ``causal_trace`` and ``patching`` (when
    ``config.attribution``), and ``total`` (load included, so ``total >= load``). The summary has
    ``causal_trace`` and ``patching`` (peak cell and probabilities; None when skipped). The
    global random state is not touched.
    """
    from mechscope.models import load
    from mechscope.models.loading import resolve_spec
    from mechscope.store import Store

    resolve_spec(config.model)  # an unknown spec fails before the store is created
    store = Store(store_dir)
    t0 = time.perf_counter()
    model = load(config.model)
    t_load = time.perf_counter() - t0
    heads: dict[str, dict[str, Any]] = {}
    with store.run("demo", config=config, model=model, seed=config.seed) as run:
        run.time("load", t_load)
        try:
            rows = _analyse(model, config, run, progress=progress)
            steps = _attribution(model, config, run, progress=progress) if config.attribution else {}
            if config.heads:
                heads.update(_heads(model, config, run, progress=progress))
            if config.circuits:
                heads.update(_heads(model, config, run, progress=progress, steps=CIRCUIT_STEPS))
                if "result" in heads.get("sae_circuit", {}):
                    heads["circuit_evaluation"] = _evaluate(
                        model, config, run, heads["sae_circuit"].pop("result"), progress=progress)
        finally:
            run.time("total", time.perf_counter() - t0)
    for h in heads.values():  # the Result objects stay out of the JSON-able summary
        h.pop("result", None)
    report_path = None
    if config.report:
        from mechscope.report import write_report

        out = Path(report) if report is not None else Path(store_dir) / "reports" / f"{run.id}.html"
        report_path = str(write_report(Store(store_dir, readonly=True), run.id, out).resolve())
    return {
        "run_id": run.id,
        "store": str(Path(store_dir).resolve()),
        "model": config.model,
        "predictions": rows,
        "causal_trace": steps.get("causal_trace"),
        "patching": steps.get("patching"),
        "heads": heads or None,
        "timings": run.timings,
        "report": report_path,
    }


def _analyse(model: Model, config: DemoConfig, run: RunWriter, *,
             progress: bool) -> list[dict[str, Any]]:
    """The demo's first step inside the run: trace the prompts, stage what it shows."""
    from mechscope.probes import trace

    t1 = time.perf_counter()
    prompts = demo_inputs(model, config)
    sites = tuple(s for s in config.sites
                  if not (getattr(model.cfg, "attn_only", False) and s in ("ffn", "ffn_pre")))
    tr = trace(model, prompts, sites=sites, progress=progress)
    run.time("trace", time.perf_counter() - t1)
    labels = list(config.prompts) if isinstance(prompts, list) else None
    return stage_trace(run, model, tr, config.model, labels=labels)


def stage_trace(run: RunWriter, model: Model, tr: Any, spec: str, *,
                labels: list[str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Stage what a :class:`~mechscope.probes.Trace` (with ``heads`` and ``patterns``) shows
    into a run; the dashboard's Heads page and the report read these. Returns the predictions.

    Stages the table ``predictions`` (each prompt's top-5 next tokens; ``labels``: the prompts'
    texts, default their token ids), tensors ``head_norms`` (``last_token_mean``: each head's
    output norm at the last real token, mean over prompts, ``[layer, head]``) and
    ``patterns_prompt{i}`` (``layer{l}``: ``[head, query, key]`` over the real tokens; only the
    first prompt's when prompts exceed 128 tokens: four of zoo:retrieval's 256-token prompts
    would be 34 MB), JSON ``tokens`` (each prompt's tokens as text), ``trace_shapes`` and
    ``model``.
    """
    from mechscope.models import describe

    tok = model.tokenizer
    rows_tokens = [[tok.decode([int(t)]) if tok is not None else str(int(t))
                    for t in tr.tokens[i, : int(tr.lengths[i])]] for i in range(tr.n_prompts)]  # fmt: skip
    labels = labels or [" ".join(row) for row in rows_tokens]
    rows = []
    for i, prompt in enumerate(labels):
        top = [tok.decode([int(t)]) if tok is not None else str(int(t)) for t in tr.top_tokens[i]]
        rows.append({"prompt": prompt, "n_tokens": int(tr.lengths[i]),
                     "top1": top[0], "p_top1": float(tr.top_logprobs[i, 0].exp()),
                     "top5": " | ".join(top)})  # fmt: skip
    run.add_table("predictions", rows)
    last = tr.lengths - 1
    norms = [tr.heads(layer)[torch.arange(tr.n_prompts), last].norm(dim=-1).mean(0)
             for layer in tr.layers("heads")]  # fmt: skip
    run.add_tensors("head_norms", {"last_token_mean": torch.stack(norms)})
    run.add_json("tokens", rows_tokens)
    for i in range(tr.n_prompts if int(tr.lengths.max()) <= 128 else 1):
        n = int(tr.lengths[i])
        run.add_tensors(f"patterns_prompt{i}", {
            f"layer{layer}": tr.pattern(layer)[i, :, :n, :n] for layer in tr.layers("patterns")})
    run.add_json("trace_shapes", tr.shapes())
    run.add_json("model", describe(model, spec).to_dict())
    return rows


def _add_result(run: RunWriter, name: str, result: Any, summary: dict[str, Any]) -> None:
    """Stage a result inside the demo's run under ``name`` (:meth:`Result.stage`), with
    ``name_summary`` (JSON: the summary and the provenance's config)."""
    result.stage(run, name)
    run.add_json(f"{name}_summary", {**summary, "config": result.provenance.config})


def _attribution(model: Model, config: DemoConfig, run: RunWriter, *,
                 progress: bool) -> dict[str, dict[str, Any]]:
    """Causal tracing of one fact and exact patching of one clean/corrupt pair, into the run."""
    from mechscope.attribution import causal_trace, patch_sweep
    from mechscope.tasks.base import TaskBatch

    tokenizer = model.tokenizer
    prompts = demo_inputs(model, config)
    skipped: dict[str, dict[str, Any]] = {}
    inputs: tuple[Any, Any, Any] | None
    if tokenizer is not None:
        prompt, subject, target = config.trace_prompt
        inputs = (prompt, subject, target)
    elif isinstance(prompts, TaskBatch) and prompts.task != "facts":
        inputs = None  # causal tracing noises a subject; of the zoo tasks only facts has one
        skipped["causal_trace"] = {"skipped": f"causal tracing noises a subject, and task "
                                   f"{prompts.task!r} has none (of the zoo, zoo:facts has)"}
    elif isinstance(prompts, TaskBatch):  # zoo:facts: [BOS] subject REL -> attribute
        a = int(prompts.answer_pos[0])
        inputs = ([int(t) for t in prompts.clean[0, : a + 1]], (1, a), int(prompts.answer[0]))
    else:
        assert isinstance(prompts, torch.Tensor)
        inputs = ([int(t) for t in prompts[0]], (1, min(3, prompts.shape[1] - 1)), None)

    trace_summary = skipped.get("causal_trace")
    if trace_summary is not None:
        run.add_json("causal_trace_summary", trace_summary)
    else:
        assert inputs is not None
        t0 = time.perf_counter()
        ct = causal_trace(model, inputs[0], inputs[1], target=inputs[2], kind="hidden",
                          samples=config.trace_samples, seed=config.seed, progress=progress)
        layer, pos = ct.argmax()
        trace_summary = {
            "prompt": inputs[0] if isinstance(inputs[0], str) else " ".join(map(str, inputs[0])),
            "subject": list(ct.subject), "target": ct.target_token, "kind": ct.trace_kind,
            "samples": ct.samples, "p_clean": ct.p_clean, "p_corrupt": ct.p_corrupt,
            "total_effect": ct.total_effect,
            "peak": {"layer": layer, "pos": pos, "token": ct.tokens[pos],
                     "indirect_effect": float(ct.indirect_effect[layer, pos])},
        }  # fmt: skip
        _add_result(run, "causal_trace", ct, trace_summary)
        run.time("causal_trace", time.perf_counter() - t0)

    t1 = time.perf_counter()
    if tokenizer is not None:
        from mechscope.tasks import ioi

        task: TaskBatch = ioi(tokenizer, 1, seed=config.seed)  # one row: no padding
    elif isinstance(prompts, TaskBatch):  # a zoo model: the first of its own pairs
        task = _first_pair(prompts)
    else:
        assert isinstance(prompts, torch.Tensor)
        task = _token_pair(model, prompts[0])
    pr = patch_sweep(model, task, site="resid_pre", by="position", progress=progress)
    flat = int(pr.scores.argmax())
    p_layer, p_pos = flat // pr.scores.shape[1], flat % pr.scores.shape[1]
    label = (lambda ids: [tokenizer.decode([int(i)]) for i in ids]) if tokenizer is not None else (
        lambda ids: [str(int(i)) for i in ids])
    patch_summary = {
        "task": task.task, "clean": "".join(label(task.clean[0])) if tokenizer is not None else
        " ".join(label(task.clean[0])), "answer": label(task.answer)[0],
        "wrong": label(task.corrupt_answer)[0], "site": "resid_pre",
        "p_clean": pr.prob_clean, "p_corrupt": pr.prob_corrupt,
        "metric_clean": pr.metric_clean, "metric_corrupt": pr.metric_corrupt,
        "peak": {"layer": p_layer, "pos": p_pos, "token": pr.tokens[p_pos],
                 "score": float(pr.scores[p_layer, p_pos])},
    }  # fmt: skip
    _add_result(run, "patching", pr, patch_summary)
    run.time("patching", time.perf_counter() - t1)
    return {"causal_trace": trace_summary, "patching": patch_summary}


#: The head analyses of the demo: (name in the run, module under mechscope.circuits).
HEAD_STEPS = (("sinks", "sinks"), ("retrieval_heads", "retrieval"), ("head_divergence", "divergence"),
              ("head_statistics", "head_stats"))
#: The circuit-discovery steps, run the same way.
CIRCUIT_STEPS = (("sae_circuit", "sae"),)


def _heads(model: Model, config: DemoConfig, run: RunWriter, *, progress: bool,
           steps: tuple[tuple[str, str], ...] = HEAD_STEPS) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each head analysis on its built-in inputs for the model, into the run. An analysis that
    cannot run on this model (e.g. retrieval heads on a random ``native:`` model, which has no
    needle task) is recorded as skipped with the reason, never silently."""
    import importlib

    from mechscope.errors import InputError

    out: dict[str, dict[str, Any]] = {}
    for name, module in steps:
        t0 = time.perf_counter()
        analysis = importlib.import_module(f"mechscope.circuits.{module}")
        try:
            result = analysis.default_run(model, seed=config.seed, progress=progress)
        except InputError as exc:
            out[name] = {"skipped": str(exc)}
            run.add_json(f"{name}_summary", out[name])
            continue
        summary = {k: v for k, v in result.payload().items() if k != "scores"}
        _add_result(run, name, result, summary)
        run.time(name, time.perf_counter() - t0)
        out[name] = {**summary, "result": result}
    return out


def _evaluate(model: Model, config: DemoConfig, run: RunWriter, sae: Any, *,
              progress: bool) -> dict[str, Any]:  # fmt: skip
    """Score the SAE circuit and the baselines (exact head patching, attribution patching, the
    task's detector) on the SAE's own batch, against the zoo ground truth or, on any other
    model, against exact head patching (:func:`~mechscope.circuits.evaluate.evaluate_methods`)."""
    from mechscope.circuits.evaluate import evaluate_methods
    from mechscope.errors import InputError

    t0 = time.perf_counter()
    try:
        # the SAE's own batch: default_run's task_batch(model, None, None, seed)
        ev = evaluate_methods(model, seed=config.seed, sae_result=sae, progress=progress)
    except InputError as exc:
        run.add_json("circuit_evaluation_summary", {"skipped": str(exc)})
        return {"skipped": str(exc)}
    summary = {k: v for k, v in ev.payload().items() if k not in ("scores", "effect")}
    _add_result(run, "circuit_evaluation", ev, summary)
    run.time("circuit_evaluation", time.perf_counter() - t0)
    return summary


def _first_pair(batch: Any) -> Any:
    """The first row of a task batch, trimmed to its real length."""
    from mechscope.tasks.base import TaskBatch

    n = int(batch.real_lengths[0])
    return TaskBatch(task=batch.task, clean=batch.clean[:1, :n], corrupt=batch.corrupt[:1, :n],
                     answer=batch.answer[:1], corrupt_answer=batch.corrupt_answer[:1],
                     answer_pos=batch.answer_pos[:1], seed=batch.seed)  # fmt: skip


@torch.no_grad()
def _token_pair(model: Model, row: torch.Tensor) -> Any:
    """A clean/corrupt pair from a row of token ids: the corrupt row shifts tokens 1..2; the
    answers are the two runs' top-1 (the corrupt run's second best when they agree)."""
    from mechscope.tasks.base import TaskBatch

    clean = row[None].long()
    corrupt = clean.clone()
    end = min(3, clean.shape[1] - 1)
    vocab = int(model.cfg.d_vocab)
    corrupt[0, 1:end] = (corrupt[0, 1:end] % (vocab - 1)) + 1  # another id, never 0
    device = next(model.parameters()).device
    last = clean.shape[1] - 1
    a = int(model(clean.to(device))[0, last].argmax())
    top2 = model(corrupt.to(device))[0, last].topk(2).indices.tolist()
    w = int(top2[0] if top2[0] != a else top2[1])
    return TaskBatch(task="demo_tokens", clean=clean, corrupt=corrupt, answer=torch.tensor([a]),
                     corrupt_answer=torch.tensor([w]), answer_pos=torch.tensor([last]),
                     seed=0)  # fmt: skip
