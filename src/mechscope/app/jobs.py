"""The Explore page's jobs: load a model, trace a prompt or run one analysis, save a run.

A job runs in a Dash background-callback process (the disk-cache manager), so it opens the
store for writing itself (``Store(root)``) and only for the run it writes; the dashboard's own
store handle stays read-only. It reports progress through ``progress(step, steps, text)`` and
returns ``{"run_id": ...}`` or ``{"error": message}``: a bad model spec or prompt becomes a
message on the page, never a traceback.

A ``trace`` run (kind ``trace``) stores what the demo's trace step stores
(:func:`mechscope.demo.stage_trace`), so the Heads page can click through it: table
``predictions``, JSON ``tokens`` and ``model``, tensors ``head_norms`` and ``patterns_prompt0``. An analysis is saved as its result's
own run (:meth:`mechscope.results.Result.save`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mechscope.app.data import parse_prompt
from mechscope.errors import InputError, MechscopeError

log = logging.getLogger(__name__)

#: Explore's choices: label -> module under mechscope.circuits ("" = the tracer).
ANALYSES = {"trace": "", "sinks": "sinks", "retrieval": "retrieval", "divergence": "divergence",
            "sae": "sae"}  # fmt: skip
#: Analyses that take the typed prompt; the others run on the model's built-in inputs.
TAKES_PROMPT = ("trace", "sinks")

Progress = Callable[[int, int, str], None]


def run_job(root: str | Path, spec: str | None, prompt: str | None, analysis: str | None,
            progress: Progress) -> dict[str, Any]:  # fmt: skip
    """Run one Explore job into the store at ``root``; see the module docstring."""
    try:
        return {"run_id": _run(Path(root), spec, prompt, analysis, progress)}
    except MechscopeError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a job must answer the page; the log keeps the traceback
        log.exception("explore job failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _run(root: Path, spec: str | None, prompt: str | None, analysis: str | None,
         progress: Progress) -> str:  # fmt: skip
    from mechscope.models import load
    from mechscope.models.loading import resolve_spec
    from mechscope.store import Store

    spec = (spec or "").strip()
    if not spec:
        raise InputError("give a model spec, e.g. zoo:induction or smollm2")
    if analysis not in ANALYSES:
        raise InputError(f"unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}")
    resolve_spec(spec)  # an unknown spec fails before anything loads
    progress(1, 4, f"loading {spec}")
    model = load(spec)
    inputs = None
    if analysis in TAKES_PROMPT and (analysis == "trace" or (prompt or "").strip()):
        inputs = parse_prompt(prompt, has_tokenizer=model.tokenizer is not None)
    progress(2, 4, f"running {analysis}")
    if analysis == "trace":
        assert inputs is not None
        run_id = _trace(Store(root), model, spec, inputs, progress)
    else:
        module = importlib.import_module(f"mechscope.circuits.{ANALYSES[analysis]}")
        kwargs: dict[str, Any] = {"prompts": [inputs]} if inputs is not None else {}
        result = module.default_run(model, seed=0, progress=False, **kwargs)
        progress(3, 4, "saving")
        run_id = result.save(Store(root))
    progress(4, 4, f"saved run {run_id}")
    return str(run_id)


def _trace(store: Any, model: Any, spec: str, inputs: str | list[int], progress: Progress) -> str:
    from mechscope.demo import stage_trace
    from mechscope.probes import trace

    prompts: Any = [inputs] if isinstance(inputs, str) else torch.tensor([inputs])
    tr = trace(model, prompts, sites=("heads", "patterns"), progress=False)
    progress(3, 4, "saving")
    text = inputs if isinstance(inputs, str) else " ".join(map(str, inputs))
    with store.run("trace", config={"prompt": text, "source": "mechscope app explore"},
                   model=model, seed=0) as run:  # fmt: skip
        stage_trace(run, model, tr, spec, labels=[text])
    return str(run.id)
