"""The main job: load a model, trace prompts, save a run to the store.

Later analyses (causal tracing, head divergence, retrieval heads, sinks, SAE circuits) add their
steps here; each step is a public function and the demo only chains them.
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


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs."""

    model: str = DEFAULT_MODEL
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    sites: tuple[str, ...] = ("heads", "patterns", "ffn", "resid")
    seed: int = 0


def demo_inputs(model: Model, config: DemoConfig) -> list[str] | torch.Tensor:
    """The demo's prompts: ``config.prompts`` for a model with a tokenizer; for zoo and native
    models (no tokenizer) as many rows of random token ids, seeded by ``config.seed`` through a
    local generator (the global torch generator is left alone)."""
    if model.tokenizer is not None:
        return list(config.prompts)
    gen = torch.Generator().manual_seed(config.seed)
    n = min(16, int(model.cfg.n_ctx))
    return torch.randint(1, int(model.cfg.d_vocab), (len(config.prompts), n), generator=gen)


def run_demo(config: DemoConfig, store_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run the demo and save it as one run; returns a JSON-able summary.

    Timings (seconds): ``load`` (the model), ``trace``, and ``total`` (load included, so
    ``total >= load``). The global random state is not touched.
    """
    from mechscope.models import load
    from mechscope.models.loading import resolve_spec
    from mechscope.store import Store

    resolve_spec(config.model)  # an unknown spec fails before the store is created
    store = Store(store_dir)
    t0 = time.perf_counter()
    model = load(config.model)
    t_load = time.perf_counter() - t0
    with store.run("demo", config=config, model=model, seed=config.seed) as run:
        run.time("load", t_load)
        try:
            rows = _analyse(model, config, run, progress=progress)
        finally:
            run.time("total", time.perf_counter() - t0)
    return {
        "run_id": run.id,
        "store": str(Path(store_dir).resolve()),
        "model": config.model,
        "predictions": rows,
        "timings": run.timings,
    }


def _analyse(model: Model, config: DemoConfig, run: RunWriter, *,
             progress: bool) -> list[dict[str, Any]]:
    """The demo's steps inside the run: trace, predictions, head norms, patterns, shapes."""
    from mechscope.models import describe
    from mechscope.probes import trace

    t1 = time.perf_counter()
    prompts = demo_inputs(model, config)
    sites = tuple(s for s in config.sites
                  if not (getattr(model.cfg, "attn_only", False) and s in ("ffn", "ffn_pre")))
    tr = trace(model, prompts, sites=sites, progress=progress)
    run.time("trace", time.perf_counter() - t1)
    tokenizer = model.tokenizer
    labels = (list(config.prompts) if isinstance(prompts, list) else
              [" ".join(map(str, row.tolist())) for row in prompts])
    rows = []
    for i, prompt in enumerate(labels):
        top = [tokenizer.decode([int(t)]) if tokenizer is not None else str(int(t))
               for t in tr.top_tokens[i]]
        rows.append({"prompt": prompt, "n_tokens": int(tr.lengths[i]),
                     "top1": top[0], "p_top1": float(tr.top_logprobs[i, 0].exp()),
                     "top5": " | ".join(top)})
    run.add_table("predictions", rows)
    # Per-head output norm at the last token, [layer, head]: the tracer's head outputs.
    norms = []
    last = (tr.lengths - 1)
    for layer in tr.layers("heads"):
        z = tr.heads(layer)[torch.arange(tr.n_prompts), last]  # [batch, head, d_head]
        norms.append(z.norm(dim=-1).mean(0))
    run.add_tensors("head_norms", {"last_token_mean": torch.stack(norms)})
    run.add_tensors("patterns_prompt0", {
        f"layer{layer}": tr.pattern(layer)[0, :, : int(tr.lengths[0]), : int(tr.lengths[0])]
        for layer in tr.layers("patterns")
    })
    run.add_json("trace_shapes", tr.shapes())
    run.add_json("model", describe(model, config.model).to_dict())
    return rows
