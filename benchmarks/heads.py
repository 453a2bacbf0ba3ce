"""Head detection: batched head statistics and retrieval scores vs their one-at-a-time peers.

Cases (one JSON line each; protocol: ../shared/PERFORMANCE.md, docs/ARCHITECTURE.md "Measuring
speed"; fp32 gate first, exit 1 on failure before timing; warm-up; alternating repetitions;
medians/min/max and peer/ours):

- ``<model>:detect``: previous-token, duplicate-token, induction (and ACT sink) scores of every
  head over 16 prompts ``[BOS] + R + R`` (R of 20-45/50 tokens, different lengths) on
  ``zoo:induction`` and SmolLM2. Peer: TransformerLens ``head_detector.detect_head`` called once
  per kind on the list of prompts (its API: one ``run_with_cache`` per prompt, a Python loop
  over heads); ours: :func:`mechscope.circuits.head_stats.head_statistics`, all kinds (sink
  included, which the peer does not have) from one batched traced forward per batch. Also the
  induction kind alone on both sides (``<model>:detect_induction``). The gate checks every TL
  kind. The peer sees token rows through a stand-in whose ``to_tokens`` returns the row (zoo
  models have no tokenizer; random ids do not round-trip through text).
- ``smollm2:retrieval``: the retrieval score of Wu et al. over a haystack grid (stdlib-docstring
  haystack, ``tasks.retrieval_grid``). Ours: :func:`mechscope.circuits.retrieval.retrieval_scores`.
  Peer: :func:`naive_retrieval_scores`, written after nightdessert/Retrieval_Head's
  ``retrieval_head_detection.py`` (``decode`` + ``retrieval_calculate``): greedy decoding token by
  token, each step a full bridge forward that caches every attention pattern
  (``run_with_cache``; the bridge's own KV cache is not exact on SmolLM2), then a Python loop over
  layers and heads doing the argmax/copy check on the last query row. Same trials, same scores.

    python benchmarks/heads.py                       # zoo:induction + SmolLM2 (detect, retrieval)
    python benchmarks/heads.py --lengths 500 1000 1500 --depths 0.1 0.5 0.9   # a larger grid
    python benchmarks/heads.py --quick               # tiny models, gates only (< 60 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformer_lens import head_detector

from _common import _time, forward_flops, matmul_gflops
from mechscope.circuits.head_stats import head_statistics
from mechscope.models import load
from mechscope.tasks.induction import induction_pool

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=64,seed=1"
TL_KINDS = ("previous_token", "duplicate_token", "induction")


def emit(row: dict[str, Any]) -> None:
    print(
        json.dumps(row, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o)),
        flush=True,
    )


def gate(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    err = float((got.double() - want.double()).abs().max())
    return err, 1e-4 * float(want.double().abs().max()) + 1e-5


def timed(peer: Callable[[], Any], ours: Callable[[], Any], reps: int) -> dict[str, Any]:
    """Alternate peer and ours ``reps`` times (the correctness gate already ran both: warm-up)."""
    tp, to = [], []
    for _ in range(reps):
        tp.append(_time(peer))
        to.append(_time(ours))
    return {"R": reps,
            "peer_s": {"median": statistics.median(tp), "min": min(tp), "max": max(tp)},
            "ours_s": {"median": statistics.median(to), "min": min(to), "max": max(to)},
            "ratio_peer_over_ours": statistics.median(tp) / statistics.median(to)}  # fmt: skip


# -- (a) head detection ------------------------------------------------------------------------


class RowsModel:
    """``detect_head``'s view of a model whose prompts are token rows: prompt ``"i"`` is row i
    (everything but ``to_tokens`` is the bridge itself)."""

    def __init__(self, model, rows: list[torch.Tensor]) -> None:
        self.model, self.rows, self.cfg = model, rows, model.cfg

    def to_tokens(self, key):
        return self.rows[0 if isinstance(key, list) else int(key)][None]

    def run_with_cache(self, *args, **kwargs):
        return self.model.run_with_cache(*args, **kwargs)


def repeated_rows(model, n: int, lo: int, hi: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` rows ``[BOS] + R + R`` with ``len(R)`` spread over ``lo..hi``."""
    tok = model.tokenizer
    pool, bos = (
        induction_pool(vocab=tok)
        if tok is not None
        else induction_pool(d_vocab=int(model.cfg.d_vocab))
    )
    g = torch.Generator().manual_seed(seed)
    pool_t = torch.as_tensor(pool)
    rows = []
    for i in range(n):
        size = lo + (hi - lo) * i // max(1, n - 1)
        r = pool_t[torch.randperm(len(pool_t), generator=g)[:size]]
        rows.append(torch.cat([torch.tensor([0 if bos is None else bos]), r, r]))
    return rows


def detect_case(model, name: str, rows: list[torch.Tensor], reps: int, quick: bool, ceiling: float,
                batch_size: int) -> list[dict[str, Any]]:  # fmt: skip
    proxy, keys = RowsModel(model, rows), [str(i) for i in range(len(rows))]
    lists = [r.tolist() for r in rows]

    def peer(kinds: Sequence[str] = TL_KINDS) -> dict[str, torch.Tensor]:
        return {k: head_detector.detect_head(proxy, keys, f"{k}_head") for k in kinds}

    def ours(kinds: Sequence[str] = (*TL_KINDS, "sink")) -> dict[str, torch.Tensor]:
        return head_statistics(
            model, lists, kinds=kinds, batch_size=batch_size, progress=False
        ).scores

    want, got = peer(), ours()
    errs = {k: gate(got[k], want[k]) for k in TL_KINDS}
    ok = all(e <= t for e, t in errs.values())
    lengths = [len(r) for r in rows]
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_batches = -(-len(rows) // batch_size)
    base = {"peer": "transformer_lens.head_detector.detect_head (one call per kind)",
            "gate": "pass" if ok else "FAIL",
            "max_abs_err": {k: e for k, (e, _) in errs.items()}, "tol": {k: t for k, (_, t) in errs.items()},
            "n_prompts": len(rows), "seq_len": {"min": min(lengths), "max": max(lengths)},
            "layers": L, "heads": H, "d_model": int(model.cfg.d_model), "batch_size": batch_size,
            "induction_top": sorted(((float(v), (i // H, i % H)) for i, v in enumerate(got["induction"].flatten())),
                                    reverse=True)[:3]}  # fmt: skip
    if not ok:
        emit({"case": f"{name}:detect", **base})
        sys.exit(1)
    rows_out = []
    for case, tl_kinds, our_kinds in [("detect", TL_KINDS, (*TL_KINDS, "sink")),
                                      ("detect_induction", ("induction",), ("induction",))]:  # fmt: skip
        row = {"case": f"{name}:{case}", **base, "kinds_peer": list(tl_kinds), "kinds_ours": list(our_kinds),
               "forwards_peer": len(tl_kinds) * len(rows), "forwards_ours": n_batches}  # fmt: skip
        if not quick:
            row |= timed(lambda k=tl_kinds: peer(k), lambda k=our_kinds: ours(k), reps)
            real = sum(forward_flops(model, 1, n) for n in lengths)
            padded = 0.0
            order = sorted(lengths)
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                padded += forward_flops(model, len(chunk), max(chunk))
            row |= {"peer_flops_vs_ours": len(tl_kinds) * real / padded,
                    "ours_gflops": padded / row["ours_s"]["median"] / 1e9,
                    "peer_gflops": len(tl_kinds) * real / row["peer_s"]["median"] / 1e9,
                    "matmul_2048_fp32_gflops": ceiling}  # fmt: skip
        emit(row)
        rows_out.append(row)
    return rows_out


# -- (b) retrieval score ------------------------------------------------------------------------


def naive_retrieval_scores(model, batches, needles: list[torch.Tensor], *, max_new_tokens: int | None = None
                           ) -> tuple[torch.Tensor, list[list[int]]]:  # fmt: skip
    """Retrieval_Head's ``decode`` + ``retrieval_calculate``, one trial (row) at a time.

    Each step runs the whole sequence (prompt + tokens generated so far) through the bridge with
    every attention pattern cached (``run_with_cache``), takes the greedy token ``w`` at the last
    position, and loops over layers and heads: when the head's top-1 key from the last query is a
    needle position holding ``w``, that position counts as copied by the head (each position
    once per trial, as METHODS.md's ``|copied ∩ needle|``; the reference adds ``1/|needle|`` per
    event). A trial decodes ``max_new_tokens`` (default: its needle's length) tokens; its score
    is ``copied / |needle|``, and it counts when the needle's tokens are found in the generation
    (ROUGE-1 recall > 0.5, as the reference's ``scorer.score(...)['rouge1'].recall > 50``). The
    result is the mean over counted trials. ``needles[b]``: ``[row, n]`` needle positions of
    batch ``b`` (-1 padding). Returns ``[layer, head]`` scores and every trial's generation.
    """
    from collections import Counter

    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
    total = [[0.0] * H for _ in range(L)]
    counted, outputs = 0, []
    for batch, pos in zip(batches, needles, strict=True):
        for i, n in enumerate(batch.real_lengths.tolist()):
            prompt = batch.clean[i, :n].tolist()
            span = [p for p in pos[i].tolist() if p >= 0]
            copied: list[list[set[int]]] = [[set() for _ in range(H)] for _ in range(L)]
            seq, generated = list(prompt), []
            for _ in range(max_new_tokens or len(span)):
                logits, cache = model.run_with_cache(torch.tensor([seq]), names_filter=names)
                w = int(logits[0, -1].argmax())
                for layer in range(L):
                    pattern = cache[names[layer]]
                    for head in range(H):
                        _, idx = pattern[0, head, -1].topk(1)
                        j = int(idx[0])
                        if j in span and prompt[j] == w:
                            copied[layer][head].add(j)
                generated.append(w)
                seq.append(w)
            outputs.append(generated)
            needle = [prompt[p] for p in span]
            recall = sum((Counter(generated) & Counter(needle)).values()) / len(needle)
            if recall > 0.5:
                counted += 1
                for layer in range(L):
                    for head in range(H):
                        total[layer][head] += len(copied[layer][head]) / len(span)
    out = torch.tensor(total, dtype=torch.float64) / max(counted, 1)
    return out.float(), outputs


def retrieval_case(model, name: str, batches: list, reps: int, quick: bool, ceiling: float,
                   max_new_tokens: int | None) -> dict[str, Any]:  # fmt: skip
    from mechscope.circuits import retrieval

    needles = [retrieval.needle_positions(b, model) for b in batches]

    def ours():
        return retrieval.retrieval_scores(
            model, batches, max_new_tokens=max_new_tokens, progress=False
        )

    def peer():
        return naive_retrieval_scores(model, batches, needles, max_new_tokens=max_new_tokens)

    got = ours()
    want, gens = peer()
    err, tol = gate(got.scores, want)
    same_gen = [list(g) for g in got.generations] == gens
    n_trials = sum(int(b.batch_size) for b in batches)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    steps = max_new_tokens or max(int((p >= 0).sum(1).max()) for p in needles)
    row = {"case": f"{name}:retrieval", "peer": "naive loop after Retrieval_Head (run_with_cache per "
           "decoded token, Python loop over layers x heads)", "gate": "pass" if err <= tol and same_gen else "FAIL",
           "max_abs_err": err, "tol": tol, "same_generations": same_gen, "trials": n_trials,
           "answered": int(got.answered.sum()),
           "cells": [[int(b.seq_len), float(b.meta["depth"])] for b in batches],
           "layers": L, "heads": H, "decode_steps": steps, "path": got.work.get("path"),
           "share_over_0.1": float((got.scores > 0.1).float().mean()),
           "top": [[lh // H, lh % H, v] for v, lh in zip(*(t.tolist() for t in got.scores.flatten().topk(3)), strict=True)]}  # fmt: skip
    if row["gate"] == "FAIL":
        emit(row)
        sys.exit(1)
    if not quick:
        tp, to = [], []
        for _ in range(reps):  # the peer takes minutes; both sides ran once above (warm-up)
            tp.append(_time(peer))
            to.append(_time(ours))
        prompt_tokens = sum(int(b.seq_len) * int(b.batch_size) for b in batches)
        row |= {"R": reps,
                "peer_s": {"median": statistics.median(tp), "min": min(tp), "max": max(tp)},
                "ours_s": {"median": statistics.median(to), "min": min(to), "max": max(to)},
                "peer_s_per_trial": statistics.median(tp) / n_trials,
                "ratio_peer_over_ours": statistics.median(tp) / statistics.median(to),
                "peer_forwards": n_trials * steps, "prompt_tokens": prompt_tokens,
                "peer_flops_vs_prefill": steps,
                "matmul_2048_fp32_gflops": ceiling}  # fmt: skip
    emit(row)
    return row


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, gates only")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--smollm2-reps", type=int, default=3, help="repetitions of the SmolLM2 detect case"
    )
    ap.add_argument(
        "--retrieval-reps", type=int, default=1, help="repetitions of the retrieval case"
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[500, 1000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-retrieval", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.quick:
        tiny = load(TINY)
        detect_case(tiny, "tiny", repeated_rows(tiny, 4, 3, 9), 0, True, 0.0, batch_size=4)
        if not args.skip_retrieval:
            from mechscope.models.zoo.data import retrieval_vocab
            from mechscope.models.zoo.recipes import RECIPES
            from mechscope.tasks.retrieval import retrieval_grid

            zoo = load("zoo:retrieval")
            vocab = retrieval_vocab(RECIPES["retrieval"])
            batches = list(retrieval_grid([48, 64], [0.3, 0.8], n=2, seed=0, vocab=vocab))
            retrieval_case(zoo, "zoo:retrieval", batches, 0, True, 0.0, args.max_new_tokens or 2)
        return
    ceiling = matmul_gflops()
    zoo = load("zoo:induction")
    detect_case(zoo, "zoo:induction", repeated_rows(zoo, 16, 20, 45), args.reps, False, ceiling, 16)
    if args.skip_smollm2:
        return
    model = load("smollm2")
    detect_case(
        model, "smollm2", repeated_rows(model, 16, 20, 50), args.smollm2_reps, False, ceiling, 8
    )
    if not args.skip_retrieval:
        from mechscope.tasks.retrieval import retrieval_grid

        batches = list(retrieval_grid(args.lengths, args.depths, n=1, seed=0, tokenizer=model.tokenizer,
                                      n_ctx=int(model.cfg.n_ctx)))  # fmt: skip
        retrieval_case(
            model, "smollm2", batches, args.retrieval_reps, False, ceiling, args.max_new_tokens
        )


if __name__ == "__main__":
    main()
