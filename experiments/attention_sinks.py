"""Attention sinks and ACT calibration on SmolLM2-135M and MiniLM (METHODS.md section 4).

1. SmolLM2 sinks (:func:`mechscope.circuits.sinks.find_sinks`) over the four built-in prompts and
   ``--haystacks`` stdlib-docstring haystacks of ``--length`` tokens (``tasks.text_retrieval``):
   where the ACT sinks are (position 0 by layer; hidden sinks at positions > 0 and their tokens),
   the share of each head's attention its sinks absorb, and the VAR massive dimensions.
2. ACT calibration on SmolLM2 with IOI (``tasks.ioi``, mixed ABBA/BABA, ABC corruption): the
   candidates are the ``--candidates`` heads whose sinks other than position 0 absorb the most
   attention on the dev prompts (what calibration would move; ACT keeps each head's first sink,
   so a head with no other sink is left unchanged); each is calibrated alone
   on the dev split (``--dev`` prompts, seed 1) and kept if accuracy improves; the kept set is
   then measured on the held-out split (``--held-out`` prompts, seed 2) against the baseline.
   (text_retrieval is solved at 100% up to 512 tokens, so it cannot show an improvement; IOI is
   the cheapest task measured below 100%: ~83-90%.)
3. MiniLM (BERT, non-causal) sinks over the built-in prompts and haystacks of up to 480 tokens
   (run first: it is fast).

Everything goes into one run of the store (``--store``): the results' frames and payloads, the
figures (``figure_<name>`` as plotly JSON) and a ``summary`` with the printed numbers.
``--quick``: 1 haystack of 256 tokens, 16/32 dev/held-out prompts, 6 candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from mechscope.circuits.sinks import PROMPTS, find_sinks, select_calibration_heads
from mechscope.models import load
from mechscope.store import Store
from mechscope.tasks import ioi, text_retrieval


def sink_numbers(res: Any) -> dict[str, Any]:
    n_layers = res.scores.shape[0]
    bos = res.sinks[0] if res.sinks and res.sinks[0]["position"] == 0 else None
    most = (res.first_share > 0.5).float().mean(1)
    hidden = [s for s in res.sinks if s["position"] > 0]
    return {
        "n_heads_absorbing_over_half": len(res.heads),
        "n_heads": int(res.scores.numel()),
        "pos0_sink_layers": bos["layers"] if bos else [],
        "pos0_tokens": bos["tokens"] if bos else {},
        "pos0_sink_frequency": bos["frequency"] if bos else 0.0,
        "share_of_heads_with_pos0_over_half_by_layer": [round(float(x), 2) for x in most],
        "absorbed_by_layer": [round(float(x), 3) for x in res.scores.mean(1)],
        "hidden_sink_positions": [
            {
                "position": s["position"],
                "frequency": round(s["frequency"], 3),
                "tokens": s["tokens"],
                "layers": s["layers"],
            }
            for s in sorted(hidden, key=lambda s: -s["frequency"])[:10]
        ],  # fmt: skip
        "hidden_sink_tokens": dict(list(res.hidden.items())[:10]),
        "massive": [
            {
                "layer": m["layer"],
                "dims": m["dims"],
                "peak": round(m["peak"], 1),
                "n_positions": len(m["positions"]),
                "top_positions": dict(sorted(m["positions"].items(), key=lambda kv: -kv[1])[:5]),
            }
            for m in res.massive
        ],  # fmt: skip
        "n_layers": n_layers,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", default="runs/attention_sinks")
    p.add_argument("--haystacks", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--dev", type=int, default=32)
    p.add_argument("--held-out", type=int, default=96)
    p.add_argument("--candidates", type=int, default=18)
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.haystacks, args.length, args.dev, args.held_out, args.candidates = 1, 256, 16, 32, 6
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    frames: dict[str, Any] = {}
    payloads: dict[str, Any] = {}

    mini = load("minilm")
    mhay = text_retrieval(mini.tokenizer, args.haystacks, context_len=min(args.length, 480),
                          seed=args.seed)  # fmt: skip  # BERT: 512 positions, [CLS]/[SEP] added
    texts = [*PROMPTS, *(mini.tokenizer.decode(r) for r in mhay.clean.tolist())]
    t = time.perf_counter()
    msinks = find_sinks(mini, texts)
    m15 = find_sinks(mini, texts, massive_threshold=15.0, progress=False)
    out["minilm_sinks"] = {**sink_numbers(msinks), "seconds": round(time.perf_counter() - t, 1),
                           "massive_at_15": sink_numbers(m15)["massive"]}  # fmt: skip
    figures["minilm_heads"] = msinks.figure()
    figures["minilm_tokens"] = msinks.figure(view="tokens")
    frames["minilm_sinks"], payloads["minilm_sinks"] = msinks.to_frame(), msinks.payload()

    model = load("smollm2")
    tok = model.tokenizer
    hay = text_retrieval(tok, args.haystacks, context_len=args.length, seed=args.seed,
                         n_ctx=int(model.cfg.n_ctx))  # fmt: skip
    prompts: list[Any] = [*PROMPTS, *hay.clean.tolist()]
    t = time.perf_counter()
    sinks = find_sinks(model, prompts)
    out["smollm2_sinks"] = {**sink_numbers(sinks), "seconds": round(time.perf_counter() - t, 1)}
    figures["smollm2_heads"] = sinks.figure()
    figures["smollm2_tokens"] = sinks.figure(view="tokens")
    frames["smollm2_sinks"], payloads["smollm2_sinks"] = sinks.to_frame(), sinks.payload()

    dev = ioi(tok, args.dev, seed=1)
    held = ioi(tok, args.held_out, seed=2)
    # what calibration would move: attention on sinks other than position 0, detected as the
    # intervention detects them (every key scored: min_queries=1)
    dev_sinks = find_sinks(model, dev, min_queries=1, progress=False)
    hidden = dev_sinks.scores - dev_sinks.first_share  # [layer, head]
    order = hidden.flatten().argsort(descending=True)[: args.candidates]
    cands = [(int(i) // hidden.shape[1], int(i) % hidden.shape[1]) for i in order]
    t = time.perf_counter()
    cal = select_calibration_heads(model, dev, held_out=held, beta=args.beta, candidates=cands)
    out["smollm2_calibration"] = {
        "task": "ioi (mixed, abc)", "candidates": cands,
        "candidate_hidden_share": [round(float(hidden[h]), 3) for h in cands],
        "dev_change_by_candidate": {f"L{a}H{b}": round(float(cal.scores[a, b]), 4)
                                    for a, b in cands},
        **cal.payload(), "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
    out["smollm2_calibration"].pop("scores")
    figures["smollm2_calibration"] = cal.figure()
    frames["smollm2_calibration"] = cal.to_frame()

    config = {k: v for k, v in vars(args).items()}
    with Store(args.store).run(
        "attention_sinks", config=config, model=model, seed=args.seed
    ) as run:
        for name, frame in frames.items():
            run.add_table(name, frame)
        for name, body in payloads.items():
            run.add_json(f"payload_{name}", body)
        for name, fig in figures.items():
            run.add_json(f"figure_{name}", json.loads(fig.to_json()))
        run.add_tensors(
            "smollm2",
            {
                "scores": sinks.scores,
                "first_share": sinks.first_share,
                "sink_freq": sinks.sink_freq,
                "calibration": cal.scores,
            },
        )
        run.add_json("summary", out)
        run.time("total", time.perf_counter() - t0)
    sys.stdout.write(json.dumps(out, indent=1, default=str) + f"\nrun {run.id} in {args.store}\n")
    torch.set_printoptions(precision=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
