"""ROME causal tracing over known facts: average indirect effects by token bucket x layer.

Reproduces the measurement of Meng et al. 2022 ("Locating and Editing Factual Associations in
GPT", fig. 2; code kmeng01/rome) with mechscope: for each known fact (prompt, subject, target) and
each kind (hidden states, MLP outputs, attention outputs, windows of ``--window`` layers for the
last two) run :func:`mechscope.attribution.causal_trace` with the subject's token embeddings
noised at ``nu = noise * sigma``, sigma being the std of the subjects' token embeddings
(:func:`subject_embedding_std`, ROME's choice), then average the indirect effects by position
bucket (:func:`aggregate_traces`). Everything goes into one run of the store.

Facts:
- ``--model smollm2``: ROME's ``known_1000.json`` restricted to the 279 facts SmolLM2-135M-Instruct
  predicts top-1 (shipped in :mod:`mechscope.data`), the first ``--n`` of them in file order; the
  target is the first token of ``" " + attribute``.
- ``--model zoo:facts``: the zoo model's synthetic fact world (``[BOS] subject REL -> attribute``,
  subjects of 2-3 tokens); the facts the model predicts top-1, shuffled by ``--seed``, first ``--n``.

Run ``python experiments/known_facts_trace.py --help``; see experiments/README.md for timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mechscope.attribution import aggregate_traces, causal_trace, subject_embedding_std
from mechscope.attribution.causal_trace_result import BUCKETS
from mechscope.models import load
from mechscope.store import Store

KINDS = ("hidden", "mlp", "attn")
LAST_SUBJECT, LAST = BUCKETS.index("last subject token"), BUCKETS.index("last token")


def smollm2_facts(model: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` of SmolLM2's 279 known facts as (prompt, subject, target) triples."""
    from mechscope.data import known_facts

    tok = model.tokenizer
    out = []
    for f in known_facts("smollm2")[:n]:
        target = tok(" " + f["attribute"], add_special_tokens=False)["input_ids"][0]
        out.append({"known_id": int(f["known_id"]), "prompt": f["prompt"], "subject": f["subject"],
                    "target": int(target), "attribute": f["attribute"],
                    "relation_id": f["relation_id"],
                    "subject_ids": tok(f["subject"], add_special_tokens=False)["input_ids"]})
    return out


@torch.no_grad()
def zoo_facts(model: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` facts of the zoo:facts world that the model predicts top-1 (shuffled by ``seed``)."""
    from mechscope.models.zoo.data import fact_world
    from mechscope.models.zoo.recipes import RECIPES

    world = fact_world(RECIPES["facts"])
    facts = world.facts()
    order = np.random.default_rng(seed).permutation(len(facts))
    out: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    for i in order:
        f = facts[int(i)]
        logits = model(torch.tensor([f.prompt], device=device))
        if int(logits[0, -1].argmax()) != f.attribute:
            continue
        k = len(f.subject)
        out.append({"known_id": int(i), "prompt": list(f.prompt), "subject": (1, 1 + k),
                    "target": f.attribute, "attribute": str(f.attribute),
                    "relation_id": str(f.relation), "subject_ids": list(f.subject)})
        if len(out) == n:
            break
    return out


def bands(n_layers: int) -> dict[str, list[int]]:
    """Early / middle / late thirds of the layers."""
    parts = np.array_split(np.arange(n_layers), 3)
    return {name: [int(x) for x in p] for name, p in zip(("early", "middle", "late"), parts, strict=True)}


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def kind_numbers(agg: Any) -> dict[str, Any]:
    """The numbers a note quotes for one kind's aggregate."""
    s = agg.scores.double()
    n_layers = s.shape[1]
    filled = torch.nan_to_num(s, nan=-math.inf)
    flat = int(filled.argmax())
    b, ly = flat // n_layers, flat % n_layers
    peak = float(s[b, ly])
    tol = 1e-6 * max(1.0, abs(peak))  # ties: same position in two buckets, windows over all layers
    tied = [BUCKETS[i] for i in range(len(BUCKETS)) if float(filled[i, ly]) >= peak - tol]
    cells = [[BUCKETS[i], j] for i in range(len(BUCKETS)) for j in range(n_layers)
             if float(filled[i, j]) >= peak - tol]
    out: dict[str, Any] = {
        "n_prompts": agg.n_prompts, "mean_total_effect": agg.total_effect,
        "peak": {"bucket": " = ".join(tied), "buckets": tied, "layer": ly, "aie": _num(peak),
                 "tied_cells": cells},
        "counts": dict(zip(BUCKETS, agg.counts, strict=True)),
    }
    for name, row in (("last_subject_token", LAST_SUBJECT), ("last_token", LAST)):
        out[name] = {band: ({"mean": _num(float(s[row, layers].mean())),
                             "max": _num(float(s[row, layers].max())), "layers": [layers[0], layers[-1]]}
                            if layers else None)
                     for band, layers in bands(n_layers).items()}  # fmt: skip
    return out


def _ties(pk: dict[str, Any]) -> str:
    layers = sorted({ly for _, ly in pk["tied_cells"]})
    return f", tied over layers {layers}" if len(layers) > 1 else ""


def verdicts(numbers: dict[str, dict[str, Any]], n_layers: int) -> list[str]:
    """The two yes/no lines: where the MLP and the attention AIE peak (ties between buckets that
    are the same position, e.g. first subsequent token = last token, count for each)."""
    lines = []
    early_mid = n_layers - len(bands(n_layers)["late"])  # layers below the late third
    if "mlp" in numbers:
        pk = numbers["mlp"]["peak"]
        yes = any(b == "last subject token" and ly < early_mid for b, ly in pk["tied_cells"])
        lines.append(f"MLP effect peaks at the last subject token in early-to-middle layers: "
                     f"{'yes' if yes else 'no'} (peak: {pk['bucket']}, layer {pk['layer']} of "
                     f"{n_layers}{_ties(pk)}; criterion: last subject token and layer < {early_mid})")
    else:
        lines.append("MLP effect peaks at the last subject token in early-to-middle layers: "
                     "not measured (mlp not in --kinds)")
    if "attn" in numbers:
        pk = numbers["attn"]["peak"]
        later = n_layers // 2
        yes = any(b == "last token" and ly >= later for b, ly in pk["tied_cells"])
        lines.append(f"attention effect peaks at the last token in later layers: "
                     f"{'yes' if yes else 'no'} (peak: {pk['bucket']}, layer {pk['layer']} of "
                     f"{n_layers}{_ties(pk)}; criterion: last token and layer >= {later})")
    else:
        lines.append("attention effect peaks at the last token in later layers: "
                     "not measured (attn not in --kinds)")
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def report(numbers: dict[str, dict[str, Any]], n_layers: int, header: str) -> str:
    lines = [header]
    for kind, num in numbers.items():
        pk = num["peak"]
        lines.append(f"[{kind}] {num['n_prompts']} prompts, mean TE {num['mean_total_effect']:.4f}; "
                     f"AIE peak {_fmt(pk['aie'])} at {pk['bucket']}, layer {pk['layer']}")
        for name in ("last_subject_token", "last_token"):
            parts = []
            for band, v in num[name].items():
                parts.append(f"{band} L{v['layers'][0]}-{v['layers'][1]} mean {_fmt(v['mean'])} "
                             f"max {_fmt(v['max'])}" if v else f"{band} (no layers)")
            lines.append(f"  AIE at {name.replace('_', ' ')}: " + "; ".join(parts))
    lines += verdicts(numbers, n_layers)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "zoo:facts"], default="smollm2")
    ap.add_argument("--n", type=int, default=100, help="facts traced (default 100)")
    ap.add_argument("--samples", type=int, default=10, help="noisy runs per trace (ROME: 10)")
    ap.add_argument("--noise", type=float, default=3.0, help="nu = noise * sigma (ROME: 3)")
    ap.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (ROME: 10)")
    ap.add_argument("--kinds", default="hidden,mlp,attn", help="comma-separated: hidden,mlp,attn")
    ap.add_argument("--store", type=Path, default=Path("mechscope-store"), help="store directory")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (and zoo fact order)")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or args.n < 1 or args.samples < 1:
        ap.error(f"--kinds takes hidden,mlp,attn (got {args.kinds!r}); --n and --samples >= 1")

    t0 = time.perf_counter()
    model = load(args.model)
    facts = smollm2_facts(model, args.n) if args.model == "smollm2" else zoo_facts(model, args.n, args.seed)
    if not facts:
        sys.stderr.write("error: no known facts to trace\n")
        return 2
    sigma = subject_embedding_std(model, [f["subject_ids"] for f in facts])
    n_layers = int(model.cfg.n_layers)
    results: dict[str, list[Any]] = {k: [] for k in kinds}
    bar = tqdm(total=len(facts) * len(kinds), desc="causal traces", file=sys.stderr)
    t_trace = time.perf_counter()
    for kind in kinds:
        for f in facts:
            subject = tuple(f["subject"]) if isinstance(f["subject"], list | tuple) else f["subject"]
            results[kind].append(causal_trace(
                model, f["prompt"], subject, target=f["target"], kind=kind, window=args.window,
                samples=args.samples, noise=args.noise, sigma=sigma, seed=args.seed,
                progress=False))
            bar.update(1)
    bar.close()
    t_trace = time.perf_counter() - t_trace
    aggs = {k: aggregate_traces(rs) for k, rs in results.items()}
    numbers = {k: kind_numbers(a) for k, a in aggs.items()}

    config = {**vars(args), "store": str(args.store), "kinds": kinds, "sigma": sigma,
              "n_facts": len(facts), "known_ids": [f["known_id"] for f in facts]}
    with Store(args.store).run("known_facts_trace", config=config, model=model, seed=args.seed) as run:
        run.add_table("facts", [{k: (json.dumps(v) if isinstance(v, list | tuple) else v)
                                 for k, v in f.items() if k != "subject_ids"} for f in facts])
        for kind, rs in results.items():
            frames = []
            for f, r in zip(facts, rs, strict=True):
                fr = r.to_frame()
                fr.insert(0, "known_id", f["known_id"])
                frames.append(fr)
            import pandas as pd

            run.add_table(f"traces_{kind}", pd.concat(frames, ignore_index=True))
            run.add_table(f"facts_{kind}", [
                {"known_id": f["known_id"], "subject_start": r.subject[0], "subject_end": r.subject[1],
                 "n_tokens": len(r.tokens), "target": r.target, "target_token": r.target_token,
                 "p_clean": r.p_clean, "p_corrupt": r.p_corrupt, "total_effect": r.total_effect,
                 "peak_layer": r.argmax()[0], "peak_pos": r.argmax()[1], "n_skipped": r.n_skipped}
                for f, r in zip(facts, rs, strict=True)])  # fmt: skip
            run.add_tensors(f"scores_{kind}", {str(f["known_id"]): r.scores
                                               for f, r in zip(facts, rs, strict=True)})
            agg = aggs[kind]
            run.add_table(f"aggregate_{kind}", agg.to_frame())
            run.add_tensors(f"aggregate_{kind}_scores", {"scores": agg.scores,
                                                         "counts": torch.tensor(agg.counts)})
            run.add_json(f"figure_{kind}", json.loads(agg.figure().to_json()))
        run.add_json("summary", {"numbers": numbers, "verdicts": verdicts(numbers, n_layers),
                                 "sigma": sigma, "n_layers": n_layers})
        run.time("trace", t_trace)
        run.time("total", time.perf_counter() - t0)
    header = (f"{args.model}: {len(facts)} facts, kinds {','.join(kinds)}, samples {args.samples}, "
              f"noise {args.noise:g} x sigma {sigma:.4f}, window {args.window}; "
              f"{t_trace:.0f} s tracing; run {run.id} in {args.store}")
    if args.json:
        sys.stdout.write(json.dumps({"run_id": run.id, "store": str(args.store), "sigma": sigma,
                                     "numbers": numbers, "verdicts": verdicts(numbers, n_layers)}) + "\n")
    else:
        sys.stdout.write(report(numbers, n_layers, header) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
