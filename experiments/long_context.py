"""Attention sinks and retrieval heads of SmolLM2-135M at its full 8,192-token context.

The pattern path cannot run here: one 8,192-token prompt's attention patterns are ~72 GiB
(``circuits.attn_path.pattern_bytes``), so both analyses take the statistics path (``path="auto"``:
a layer-by-layer forward with memory-efficient attention, statistics by
``mechscope.kernels.attention_stats``; no ``[query, key]`` tensor).

1. Sinks (:func:`mechscope.circuits.sinks.find_sinks`) over one ``text_retrieval`` haystack
   prompt of ``--long`` tokens (default: the model's context), and of ``--short`` tokens for the
   comparison: is position 0 the dominant sink (its ACT frequency over layer x head, the
   ``first_share`` mean, the heads whose sinks absorb > 0.5, the most frequent sink position > 0)?
2. Retrieval heads (Wu et al. 2024, :func:`mechscope.circuits.retrieval.retrieval_grid_scores`)
   over depths ``--depths`` at one length close to the context (the context minus the needle's
   decode steps, plus one: what the library's n_ctx check allows) and at ``--short`` tokens:
   answered trials, top-10 heads, and whether the top heads sit in layers 17-18 as at short
   context (``experiments/retrieval_heads.py``: L18H6, L18H7, L17H3 at 300-1,500 tokens).
3. Wall time and peak RSS of each part: ``VmHWM`` reset before the part (``/proc/self/clear_refs``;
   the part's own peak) and ``ru_maxrss`` after it (the process's peak so far).

One store run (kind ``long_context``): the sinks frames (``sinks_long``, ``sinks_short``), the
retrieval head tables and trials, tensors (``sinks``: scores / first_share per length;
``retrieval``: scores per length), ``summary`` (the printed numbers); plus the results as runs of
their own. A failure of one part is recorded (its traceback in ``summary``) and the others still run.

    python experiments/long_context.py --store /tmp/lc            # ~2.5 min on 2 quiet CPU cores
    python experiments/long_context.py --quick --store /tmp/lc    # --long 1024: a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mechscope.circuits.attn_path import choose_path
from mechscope.circuits.retrieval import needle_positions, retrieval_grid_scores
from mechscope.circuits.sinks import find_sinks
from mechscope.models import load
from mechscope.store import Store
from mechscope.tasks import text_retrieval

SHORT_CONTEXT_TOP = ["L18H6", "L18H7", "L17H3", "L20H6", "L17H4"]  # retrieval_heads.py, measured


def _vm(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measured(name: str, fn: Callable[[], Any], out: dict[str, Any]) -> Any:
    """Run ``fn``; record its wall time and peak RSS under ``out["cost"][name]``; on an error,
    record the traceback under ``out["errors"][name]`` and return None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the part's own peak
        reset = True
    except OSError:
        reset = False
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    result, error = None, None
    try:
        result = fn()
    except Exception:  # noqa: BLE001 - recorded and reported, the other parts still run
        error = traceback.format_exc()
        sys.stderr.write(f"{name} failed:\n{error}")
    cost = {"seconds": round(time.perf_counter() - t0, 1), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(_vm("VmHWM"), 1) if reset else None,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "ok": error is None}  # fmt: skip
    out.setdefault("cost", {})[name] = cost
    if error is not None:
        out.setdefault("errors", {})[name] = error
    sys.stderr.write(f"[{name}] {json.dumps(cost)}\n")
    return result


def sink_numbers(res: Any) -> dict[str, Any]:
    """Is position 0 the dominant sink? (from an :class:`AttentionSinks` of one prompt)."""
    by_pos = {s["position"]: s for s in res.sinks}
    pos0 = by_pos.get(0)
    others = sorted((s for s in res.sinks if s["position"] > 0), key=lambda s: -s["frequency"])
    freq = res.sink_freq.nan_to_num()  # [layer, head, pos]: 1 where pos is a sink of the head
    per_pos = freq.mean((0, 1))  # [pos]
    top_other = others[0] if others else None
    return {
        "length": res.lengths[0],
        "attention_path": res.attention_path,
        "pos0_frequency": pos0["frequency"] if pos0 else 0.0,
        "pos0_tokens": pos0["tokens"] if pos0 else {},
        "pos0_sink_layers": pos0["layers"] if pos0 else [],
        "pos0_is_most_frequent_sink": bool(int(per_pos.argmax()) == 0),
        "first_share_mean": round(float(res.first_share.mean()), 4),
        "absorbed_mean": round(float(res.scores.mean()), 4),
        "pos0_share_of_absorbed": round(float(res.first_share.sum() / res.scores.sum()), 4),
        "heads_absorbed_over_half": len(res.heads),
        "heads_first_share_over_half": int((res.first_share > 0.5).sum()),
        "n_heads": int(res.scores.numel()),
        "first_share_by_layer": [round(float(x), 3) for x in res.first_share.mean(1)],
        "top_other_sink": None if top_other is None else {
            "position": top_other["position"], "frequency": round(top_other["frequency"], 4),
            "tokens": top_other["tokens"]},
        "n_other_sink_positions": len(others),
        "other_positions_with_any_sink": int((per_pos[1:] > 0).sum()),
        "hidden_sink_tokens": dict(list(res.hidden.items())[:10]),
    }  # fmt: skip


def retrieval_numbers(res: Any, tok: Any) -> dict[str, Any]:
    top = res.top(10)
    names = [f"L{a}H{b}" for a, b, _ in top]
    return {
        "n_trials": len(res.answered), "n_answered": res.n_answered,
        "answered_by_depth": {str(c["depth"]): bool(a)
                              for c, a in zip(res.cells, res.answered.tolist(), strict=True)},
        "generated": [tok.decode(g) for g in res.generations],
        "needle": [tok.decode(n) for n in res.needles],
        "top10": [[a, b, round(s, 3)] for a, b, s in top],
        "n_above_0.1": len(res.heads), "share_above_0.1": round(res.share_above(0.1), 4),
        "top5_in_layers_17_18": sum(a in (17, 18) for a, _, _ in top[:5]),
        "top1_in_layers_17_18": bool(top and top[0][0] in (17, 18) and top[0][2] > 0),
        "short_context_top5_found_in_top10": [h for h in SHORT_CONTEXT_TOP if h in names],
        "path": res.work.get("path"), "attention_path": res.work.get("attention_path"),
        "gate": res.work.get("gate"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--long", type=int, default=None, help="tokens (default: the model's n_ctx)")
    ap.add_argument("--short", type=int, default=512)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", type=Path, default=Path("runs/long_context"))
    ap.add_argument("--quick", action="store_true", help="--long 1024 (a smoke run)")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    out: dict[str, Any] = {}
    model = load("smollm2")
    tok, n_ctx = model.tokenizer, int(model.cfg.n_ctx)
    long_len = 1024 if args.quick else (args.long or n_ctx)
    depths = [float(x) for x in args.depths.split(",")]
    # the needle's decode steps: the check is prompt + steps - 1 <= n_ctx
    probe = text_retrieval(tok, 1, context_len=args.short, depth=depths[0], seed=args.seed)
    steps = int((needle_positions(probe, model) >= 0).sum())
    ret_long = min(long_len, n_ctx - steps + 1)
    out["setup"] = {"model": "smollm2", "n_ctx": n_ctx, "long": long_len, "short": args.short,
                    "retrieval_long": ret_long, "needle_steps": steps, "depths": depths,
                    "torch_threads": torch.get_num_threads(),
                    "path_long": choose_path(model, [long_len]).as_dict(),
                    "path_short": choose_path(model, [args.short]).as_dict()}  # fmt: skip
    sys.stderr.write(f"setup {json.dumps(out['setup'])}\n")

    # warm-up: the first forward pages the weights in (~420 MiB), which is no part's own cost
    find_sinks(model, "Hello, world.", progress=False)
    sinks: dict[str, Any] = {}
    for name, n in (("short", args.short), ("long", long_len)):
        hay = text_retrieval(tok, 1, context_len=n, depth=0.5, seed=args.seed, n_ctx=n_ctx)
        res = measured(f"sinks_{name}", partial(find_sinks, model, hay, progress=True), out)
        if res is not None:
            sinks[name] = res
            out[f"sinks_{name}"] = sink_numbers(res)
    rets: dict[str, Any] = {}
    for name, n in (("short", args.short), ("long", ret_long)):
        grid = partial(retrieval_grid_scores, model, tok, [n], depths, n=1, seed=args.seed,
                       path="auto")  # fmt: skip
        res = measured(f"retrieval_{name}", grid, out)
        if res is not None:
            rets[name] = res
            out[f"retrieval_{name}"] = retrieval_numbers(res, tok)
    if "short" in rets and "long" in rets:
        top_s = {(a, b) for a, b, _ in rets["short"].top(10)}
        top_l = {(a, b) for a, b, _ in rets["long"].top(10)}
        out["retrieval_top10_overlap"] = len(top_s & top_l)
    out["total_s"] = round(time.perf_counter() - t_all, 1)

    store = Store(args.store)
    config = {**vars(args), "store": str(args.store), "long": long_len, "retrieval_long": ret_long,
              "depths": depths}  # fmt: skip
    with store.run("long_context", config=config, model=model, seed=args.seed) as run:
        for name, res in sinks.items():
            run.add_table(f"sinks_{name}", res.to_frame())
        for name, res in rets.items():
            run.add_table(f"retrieval_{name}", res.to_frame())
        if sinks:
            run.add_tensors("sinks", {f"{k}_{f}": getattr(r, f) for k, r in sinks.items()
                                      for f in ("scores", "first_share")})  # fmt: skip
        if rets:
            run.add_tensors("retrieval", {f"{k}_scores": r.scores for k, r in rets.items()})
        run.add_json("summary", out)
        for part, cost in out["cost"].items():
            run.time(part, cost["seconds"])
        run.time("total", out["total_s"])
    saved = [r.save(store) for r in (*sinks.values(), *rets.values())]
    sys.stdout.write(json.dumps(out, indent=1, default=str) + "\n")
    sys.stdout.write(
        report(out) + f"\nrun {run.id} (+ results {', '.join(saved)}) in {args.store}\n"
    )
    return 1 if out.get("errors") else 0


def report(out: dict[str, Any]) -> str:
    """The summary in words."""
    lines = []
    for name in ("short", "long"):
        s = out.get(f"sinks_{name}")
        if s:
            other = s["top_other_sink"]
            lines.append(
                f"sinks @ {s['length']} ({s['attention_path']['path']} path): position 0 is a sink "
                f"of {s['pos0_frequency']:.1%} of layer x head (layers {s['pos0_sink_layers']}), "
                f"most frequent sink: {s['pos0_is_most_frequent_sink']}; first_share mean "
                f"{s['first_share_mean']:.3f} of absorbed {s['absorbed_mean']:.3f}; heads absorbing "
                f"> 0.5: {s['heads_absorbed_over_half']}/{s['n_heads']} (position 0 alone > 0.5: "
                f"{s['heads_first_share_over_half']}); next sink position: "
                f"{other['position'] if other else None} ({other['frequency'] if other else 0})"
            )
        r = out.get(f"retrieval_{name}")
        if r:
            top = ", ".join(f"L{a}H{b}={v}" for a, b, v in r["top10"] if v > 0)
            lines.append(
                f"retrieval @ {name} ({r['path']}, attention {r['attention_path']['path']}): "
                f"{r['n_answered']}/{r['n_trials']} answered {r['answered_by_depth']} (generated "
                f"{r['generated']}, needle {r['needle']}); top-10 (> 0) {top}; "
                f"top-5 in layers 17-18: {r['top5_in_layers_17_18']}; short-context top heads in "
                f"top-10: {r['short_context_top5_found_in_top10']}"
            )
    if "retrieval_top10_overlap" in out:
        lines.append(f"retrieval top-10 overlap short vs long: {out['retrieval_top10_overlap']}/10")
    for part, cost in out.get("cost", {}).items():
        lines.append(f"{part}: {cost['seconds']} s, peak RSS {cost['peak_rss_mb']} MiB "
                     f"(ru_maxrss {cost['ru_maxrss_mb']} MiB){'' if cost['ok'] else ' FAILED'}")  # fmt: skip
    for part, tb in out.get("errors", {}).items():
        lines.append(f"{part} failed:\n{tb}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
