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


def run_demo(config: DemoConfig, store_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run the demo and save it as one run; returns a JSON-able summary."""
    from mechscope.models import describe, load
    from mechscope.probes import trace
    from mechscope.store import Store

    torch.manual_seed(config.seed)
    store = Store(store_dir)
    t0 = time.time()
    model = load(config.model)
    t_load = time.time() - t0
    with store.run("demo", config=config, model=model, seed=config.seed) as run:
        t1 = time.time()
        prompts: Any = list(config.prompts)
        if model.tokenizer is None:  # zoo/native models: seeded random token prompts
            gen = torch.Generator().manual_seed(config.seed)
            n = min(16, int(model.cfg.n_ctx))
            prompts = torch.randint(1, int(model.cfg.d_vocab), (len(prompts), n), generator=gen)
        sites = tuple(s for s in config.sites
                      if not (getattr(model.cfg, "attn_only", False) and s in ("ffn", "ffn_pre")))
        tr = trace(model, prompts, sites=sites, progress=progress)
        run.time("load", t_load)
        run.time("trace", time.time() - t1)
        tokenizer = model.tokenizer
        rows = []
        for i, prompt in enumerate(config.prompts if tokenizer is not None else
                                   [" ".join(map(str, row.tolist())) for row in prompts]):
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
    return {
        "run_id": run.id,
        "store": str(Path(store_dir).resolve()),
        "model": config.model,
        "predictions": rows,
        "timings": run.timings,
    }
