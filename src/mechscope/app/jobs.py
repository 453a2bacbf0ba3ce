"""The Explore page's jobs: load a model, trace a prompt or run one analysis, save a run.

A job runs in a Dash background-callback process (the disk-cache manager), so it opens the
store for writing itself (``Store(root)``) and only for the run it writes; the dashboard's own
store handle stays read-only. It reports progress through ``progress(step, steps, text)`` and
returns ``{"run_id": ...}`` or ``{"error": message}``: a bad model spec or prompt becomes a
message on the page, never a traceback.

A ``trace`` run (kind ``trace``) stores what the demo's trace step stores, so the Heads page can
click through it: table ``predictions``, JSON ``tokens`` (token labels per prompt) and
``model``, tensors ``head_norms`` ``{"last_token_mean": [layer, head]}`` and
``patterns_prompt0`` ``{"layer{l}": [head, query, key]}``. An analysis is saved as its result's
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
    from mechscope.models import describe
    from mechscope.probes import trace

    prompts: Any = [inputs] if isinstance(inputs, str) else torch.tensor([inputs])
    tr = trace(model, prompts, sites=("heads", "patterns"), progress=False)
    n = int(tr.lengths[0])
    tok = model.tokenizer
    label = (lambda i: tok.decode([int(i)])) if tok is not None else (lambda i: str(int(i)))
    top = [label(t) for t in tr.top_tokens[0]]
    progress(3, 4, "saving")
    config = {"prompt": inputs if isinstance(inputs, str) else " ".join(map(str, inputs)),
              "source": "mechscope app explore"}  # fmt: skip
    with store.run("trace", config=config, model=model, seed=0) as run:
        run.add_table("predictions", [{"prompt": config["prompt"], "n_tokens": n, "top1": top[0],
                                       "p_top1": float(tr.top_logprobs[0, 0].exp()),
                                       "top5": " | ".join(top[:5])}])  # fmt: skip
        run.add_json("tokens", [[label(t) for t in tr.tokens[0, :n]]])
        norms = [tr.heads(layer)[0, n - 1].norm(dim=-1) for layer in tr.layers("heads")]
        run.add_tensors("head_norms", {"last_token_mean": torch.stack(norms)})
        run.add_tensors("patterns_prompt0", {f"layer{layer}": tr.pattern(layer)[0, :, :n, :n]
                                             for layer in tr.layers("patterns")})  # fmt: skip
        run.add_json("model", describe(model, spec).to_dict())
    return str(run.id)
