"""Retrieval heads (Wu et al. 2024; METHODS.md section 3): which heads copy the needle.

The model decodes greedily on needle-in-a-haystack prompts. At each generated token ``w``, head
``h`` *copy-pastes* when ``w`` is a needle token and the head's argmax attention (from the query
that produced ``w``) lands on a needle position holding ``w``. A trial's score of ``h`` is the
number of distinct needle positions ``h`` copied divided by the needle's length; ``scores`` average
it over the trials the model answered (ROUGE-1 recall of the needle tokens in its generation
> 0.5). Retrieval heads: score > 0.1.

The needle is the part of the value the model must generate: ``tasks.retrieval`` (zoo): the value
token at ``needle_start + 1``; ``tasks.text_retrieval``: the value's tokens from ``value_start + k``
on, ``k`` being the value tokens the prompt already ends with (SmolLM2: the lone space, so the
needle is the passcode's four digits); anything else: ``needle_spans`` (per row, end exclusive).

The reference code (nightdessert/Retrieval_Head) takes the whole needle sentence as candidate
positions and adds ``1/|needle|`` per event; we count each needle position once per trial (a head
copying the same position twice is not twice as much a retrieval head). Decoding runs
``len(needle)`` tokens per row (``max_new_tokens`` overrides).

Paths. ``engine``: :class:`~mechscope.attribution.engine.Engine` prefill plus a key/value cache
step per token (the bridge's own cache is not exact); every head's argmax in one tensor op per
step. Trusted after a gate on the first batch: last-position logits pass ``agrees`` against the
bridge's, and the last-query argmax attention equals the Tracer's ``patterns`` at every head whose
top two weights differ by > 1e-5. ``hooks``: a full bridge forward per step, a Tracer capturing
``patterns`` at the last position. ``work`` says which ran and why. When the longest prompt's
patterns would exceed the memory budget, the engine prefills by the statistics path
(:mod:`~mechscope.circuits.attn_path`: no ``[query, key]`` tensor; its gate compares the first
256 tokens), as ``work["attention_path"]`` says. Rows of a batch must have equal lengths (every
retrieval generator's do).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.attribution.engine import Engine, agrees
from mechscope.circuits.attn_path import StatsForward, choose_path
from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap
from mechscope.probes import Tracer
from mechscope.results import Provenance, Result
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model

__all__ = ["RetrievalScores", "copy_events", "default_run", "needle_positions",
           "retrieval_grid_scores", "retrieval_scores", "rouge1_recall"]  # fmt: skip

THRESHOLD = 0.1
GATE_TOKENS = 256  # the statistics path's gate compares this many first tokens with the bridge
TIE = 1e-5  # argmax gate: heads whose top two weights are closer than this are not compared
EngineChoice = str  # "auto" | "engine" | "hooks" (checked at run time, InputError otherwise)


# -- pure scoring -----------------------------------------------------------------------------


def copy_events(argmax_pos: Tensor, generated: Tensor, needle_pos: Tensor, tokens: Tensor) -> Tensor:
    """Copy-paste events of every head at one decoding step, ``[row, layer, head, needle]`` bool.

    Args:
        argmax_pos: ``[row, layer, head]`` the key each head attends most to.
        generated: ``[row]`` the token generated at this step.
        needle_pos: ``[row, n]`` needle positions, ``-1`` padding.
        tokens: ``[row, pos]`` the sequence (prompt first).

    Event ``[r, l, h, j]``: head (l, h) attends most to needle position ``needle_pos[r, j]`` and
    that position holds the generated token.

    >>> ev = copy_events(torch.tensor([[[3, 1]]]), torch.tensor([7]), torch.tensor([[3, 4]]),
    ...                  torch.tensor([[0, 7, 0, 7, 5]]))
    >>> ev[0, 0].int().tolist()
    [[1, 0], [0, 0]]
    """
    safe = needle_pos.clamp(min=0)
    holds = (tokens.gather(1, safe) == generated[:, None]) & (needle_pos >= 0)  # [row, n]
    hit = argmax_pos[..., None] == needle_pos[:, None, None, :]  # [row, layer, head, n]
    return hit & holds[:, None, None, :]


def rouge1_recall(generated: Sequence[Sequence[int]], needles: Sequence[Sequence[int]]) -> Tensor:
    """ROUGE-1 recall per trial: needle tokens (as a multiset) found in the generation.

    >>> [round(x, 4) for x in rouge1_recall([[5, 6, 6], [1]], [[6, 6, 7], [2]]).tolist()]
    [0.6667, 0.0]
    """
    out = []
    for gen, nd in zip(generated, needles, strict=True):
        overlap = sum((Counter(int(t) for t in gen) & Counter(int(t) for t in nd)).values())
        out.append(overlap / max(len(nd), 1))
    return torch.tensor(out, dtype=torch.float32)


# -- needles ----------------------------------------------------------------------------------


def _text_needle(batch: TaskBatch, row: int, tok: Any) -> list[int]:
    from mechscope.tasks._text import encode

    vs, value = int(batch.meta["value_start"][row]), int(batch.meta["value"][row])
    ids = encode(tok, f" {value}")
    clean, t = batch.clean[row], batch.seq_len
    if clean[vs : vs + len(ids)].tolist() != ids:
        raise InputError(f"row {row}: the value {value} is not at value_start={vs}; was the "
                         "batch made with this model's tokenizer?")  # fmt: skip
    for k in range(len(ids)):  # the prompt already ends with ids[:k]
        if ids[k] == int(batch.answer[row]) and clean[t - k : t].tolist() == ids[:k]:
            return list(range(vs + k, vs + len(ids)))
    raise InputError(f"row {row}: the answer token is not in the needle's value")


def needle_positions(batch: TaskBatch, model: Model | None = None,
                     needle_spans: Sequence[tuple[int, int]] | None = None) -> Tensor:  # fmt: skip
    """``[row, n]`` positions of the needle tokens the model must reproduce (``-1`` padding);
    see the module docstring for what the needle is per task."""
    t = batch.seq_len
    rows: list[list[int]] = []
    if needle_spans is not None:
        spans = list(needle_spans)
        if len(spans) != batch.batch_size:
            raise InputError(f"needle_spans has {len(spans)} spans for {batch.batch_size} rows; "
                             "give one (start, end) per row")  # fmt: skip
        for s, e in spans:
            if e - s > t:
                raise InputError(f"the needle ({e - s} tokens) is longer than the context ({t} "
                                 "tokens); use a shorter needle or a longer prompt")  # fmt: skip
            if not 0 <= s < e <= t:
                raise InputError(f"needle span ({s}, {e}) lies outside the prompt (0..{t}); give "
                                 "(start, end) token positions inside it, end exclusive")  # fmt: skip
            rows.append(list(range(s, e)))
    elif batch.task == "retrieval" and "needle_start" in batch.meta:
        rows = [[int(s) + 1] for s in batch.meta["needle_start"]]
    elif batch.task == "retrieval_text" and "value_start" in batch.meta:
        if model is None or getattr(model, "tokenizer", None) is None:
            raise InputError("text_retrieval needles need the model's tokenizer")
        rows = [_text_needle(batch, r, model.tokenizer) for r in range(batch.batch_size)]
    else:
        raise InputError(f"a {batch.task!r} batch has no known needle; pass needle_spans=[(start, "
                         "end), ...] per row, or use tasks.retrieval / tasks.text_retrieval")  # fmt: skip
    if any(p >= t for r in rows for p in r):
        raise InputError("a needle position lies outside the prompt")
    return torch.tensor([r + [-1] * (max(map(len, rows)) - len(r)) for r in rows], dtype=torch.long)


# -- decoding ---------------------------------------------------------------------------------


def _check_model(model: Model) -> None:
    names = getattr(model, "hook_dict", {})
    missing = [ly for ly in range(int(model.cfg.n_layers))
               if f"blocks.{ly}.attn.hook_pattern" not in names]  # fmt: skip
    if missing:
        raise InputError(f"the model has no attention pattern hook (blocks.{missing[0]}.attn."
                         "hook_pattern); retrieval scores need a model whose attention pattern "
                         "the tracer can read (a TransformerLens bridge decoder)")  # fmt: skip
    if "bert" in str(getattr(model.cfg, "original_architecture", None) or "").lower():
        raise InputError("retrieval scores need a causal decoder that generates; this is an encoder")


def _argmax(pattern: Tensor) -> Tensor:  # [layer, row, head, key] -> [row, layer, head]
    return pattern.argmax(-1).permute(1, 0, 2)


Decoded = tuple[Tensor, Tensor, Tensor, Tensor]


def _decode_engine(eng: Engine, tokens: Tensor, steps: int, sf: StatsForward | None = None) -> Decoded:
    """Greedy decoding with the engine's cache: generated ``[row, step]``, argmax ``[step, row,
    layer, head]``, and the prompt's last logits and last-query patterns (for the gate). ``sf``:
    prefill by the statistics path (no ``[query, key]`` tensor)."""
    rows, t = tokens.shape
    pos = torch.arange(t).expand(rows, -1)
    cache, x, pat = sf.prefill(tokens) if sf is not None else eng.prefill(eng.embed(tokens, pos))
    logits = eng.logits(x[:, -1])
    first_logits, first_pat = logits, pat
    gen, arg = [], []
    for s in range(steps):
        w = logits.argmax(-1)
        gen.append(w)
        arg.append(_argmax(pat))
        if s + 1 < steps:
            new = eng.embed(w[:, None], torch.full((rows, 1), t + s))[:, 0]
            cache, xl, pat = eng.step(cache, new)
            logits = eng.logits(xl)
    return torch.stack(gen, 1), torch.stack(arg), first_logits, first_pat


def _decode_hooks(model: Model, tokens: Tensor, steps: int) -> Decoded:
    """As :func:`_decode_engine`, by a full bridge forward per step."""
    n_layers = int(model.cfg.n_layers)
    seq, gen, arg = tokens, [], []
    first: tuple[Tensor, Tensor] | None = None
    with Tracer(model, sites=("patterns",), positions=(-1,), batch_size=len(tokens)) as tracer:
        for _ in range(steps):
            logits, trace = tracer.forward(seq)
            last = logits[:, -1].float().cpu()
            pat = torch.stack([trace.pattern(ly)[:, :, 0] for ly in range(n_layers)]).float()
            first = first or (last, pat)
            w = last.argmax(-1)
            gen.append(w)
            arg.append(_argmax(pat))
            seq = torch.cat([seq, w[:, None].to(seq.device)], 1)
    assert first is not None
    return torch.stack(gen, 1), torch.stack(arg), first[0], first[1]


def _gate(model: Model, tokens: Tensor, own: Decoded) -> tuple[str | None, dict[str, Any]]:
    """Why the engine's decoding ``own`` of ``tokens`` may not be trusted (None: it may), and the
    gate's numbers."""
    own_logits, own_pat = own[2], own[3]
    _, _, logits, pat = _decode_hooks(model, tokens, 1)
    ok, diff = agrees(own_logits, logits)
    top2 = pat.topk(min(2, pat.shape[-1]), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > TIE) if pat.shape[-1] > 1 else top2[..., 0] > -1
    mismatch = int(((own_pat.argmax(-1) != pat.argmax(-1)) & clear).sum())
    info = {"logit_diff": diff, "argmax_mismatch": mismatch, "near_ties": int((~clear).sum())}
    if not ok:
        return f"its prompt logits differ from the bridge's by {diff:.3g} (fp32 gate)", info
    if mismatch:
        return f"its last-query argmax attention differs from the bridge's at {mismatch} heads", info
    return None, info


def _choose(model: Model, engine: EngineChoice, tokens: Tensor, steps: int, path: str = "auto",
            longest: int | None = None
            ) -> tuple[Engine | None, StatsForward | None, dict[str, Any], Decoded | None]:  # fmt: skip
    """The engine (or None: hooks), its statistics-path prefill (None: eager), why, and the
    engine's decoding of the first batch ``tokens`` that the gate checked (reused). On the
    statistics path the gate compares the first :data:`GATE_TOKENS` tokens (the bridge's eager
    forward does not fit at full length), and the prefill's attention is checked in the tests.
    ``longest``: the longest prompt of the run (the path is chosen for it; default: ``tokens``')."""
    if engine not in ("auto", "engine", "hooks"):
        raise InputError(f"engine must be 'auto', 'engine' or 'hooks', got {engine!r}")
    choice = choose_path(model, [longest or tokens.shape[1]], path)
    if engine == "hooks":
        if choice.path == "stats":
            raise InputError(f"engine='hooks' runs the bridge's eager attention, but {choice.why}; "
                             "use engine='auto'")  # fmt: skip
        return None, None, {"path": "hooks", "why": "engine='hooks'",
                            "attention_path": choice.as_dict()}, None
    why = Engine.why_not(model)
    eng = Engine.of(model) if why is None else None
    if eng is not None and eng._embed is None:
        why, eng = "the engine cannot embed new tokens for this model", None
    sf = StatsForward(model, eng) if choice.path == "stats" and eng is not None else None
    gate: dict[str, Any] = {}
    own: Decoded | None = None
    if eng is not None:
        head = tokens[:, :GATE_TOKENS] if sf is not None else tokens
        with torch.no_grad():
            own = _decode_engine(eng, head, 1 if sf is not None else steps, sf)
            why, gate = _gate(model, head, own)
    if why is not None:
        if engine == "engine" or choice.path == "stats":
            raise InputError(f"the engine cannot decode this model: {why}; use engine='hooks' on "
                             "prompts whose patterns fit the memory budget")  # fmt: skip
        return None, None, {"path": "hooks", "why": why, "gate": gate,
                            "attention_path": choice.as_dict()}, None
    return eng, sf, {"path": "engine", "why": "engine gate passed on the first batch", "gate": gate,
                     "attention_path": choice.as_dict()}, None if sf is not None else own


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class RetrievalScores(Result):
    """Retrieval scores of every head (see the module docstring).

    Attributes:
        scores: ``[layer, head]`` mean score over answered trials (0 when none answered).
        per_trial: ``[trial, layer, head]`` distinct needle positions each head copied.
        needle_len: ``[trial]`` needle tokens per trial.
        answered: ``[trial]`` ROUGE-1 recall > 0.5.
        recall: ``[trial]`` ROUGE-1 recall of the needle tokens in the generation.
        generations, needles: per trial, the generated and the needle token ids.
        step_copies: ``[trial, step]`` heads copy-pasting at each generated token (-1: not decoded).
        cells: per trial ``{"batch", "row", "context_len", "depth"}``.
        threshold: retrieval heads have a score above it.
        work: which path ran and why, the gate's numbers, timings.
    """

    scores: Tensor
    per_trial: Tensor
    needle_len: Tensor
    answered: Tensor
    recall: Tensor
    generations: list[list[int]]
    needles: list[list[int]]
    step_copies: Tensor
    cells: list[dict[str, Any]]
    threshold: float = THRESHOLD
    work: dict[str, Any] = field(default_factory=dict)

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Heads scoring above :attr:`threshold`, highest first."""
        return [(a, h) for a, h, _ in self.top(self.scores.numel()) if self.scores[a, h] > self.threshold]

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``."""
        flat = self.scores.flatten()
        order = torch.argsort(-flat, stable=True)[:k]
        n_heads = self.scores.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(flat[i])) for i in order]

    def share_above(self, threshold: float | None = None) -> float:
        """Fraction of all heads scoring above ``threshold`` (default :attr:`threshold`)."""
        cut = self.threshold if threshold is None else threshold
        return float((self.scores > cut).float().mean())

    n_answered = property(lambda self: int(self.answered.sum()), doc="Trials answered.")

    def to_frame(self) -> pd.DataFrame:
        n_layers, n_heads = self.scores.shape
        return pd.DataFrame({"layer": [lay for lay in range(n_layers) for _ in range(n_heads)],
                             "head": [h for _ in range(n_layers) for h in range(n_heads)],
                             "score": self.scores.flatten().tolist(),
                             "retrieval": (self.scores > self.threshold).flatten().tolist()})  # fmt: skip

    def figure(self, view: str = "heads") -> go.Figure:
        """``heads``: the layer x head score heatmap; ``trials``: heads copy-pasting at each
        generated token of each trial (answered trials marked)."""
        if view == "heads":
            return layer_head_heatmap(self.scores, colorscale="Viridis",
                                      title=f"retrieval score ({self.n_answered}/{len(self.answered)}"
                                            f" trials answered; > {self.threshold}: retrieval head)")  # fmt: skip
        if view != "trials":
            raise InputError(f"view must be 'heads' or 'trials', got {view!r}")
        z = self.step_copies.float().masked_fill(self.step_copies < 0, float("nan"))
        ylab = [f"{i}: L{c.get('context_len')} d{c.get('depth')}{'' if a else ' (missed)'}"
                for i, (c, a) in enumerate(zip(self.cells, self.answered.tolist(), strict=True))]  # fmt: skip
        fig = go.Figure(go.Heatmap(z=z.numpy(), y=ylab, colorscale="Viridis",
                                   hovertemplate="trial %{y}, token %{x}: %{z} heads<extra></extra>"))  # fmt: skip
        fig.update_layout(title="heads copy-pasting at each generated needle token",
                          xaxis_title="generated token", yaxis_title="trial")  # fmt: skip
        return fig

    def payload(self) -> dict[str, Any]:
        """The CLI's ``--json`` body."""
        return {"scores": [[float(x) for x in row] for row in self.scores.tolist()],
                "heads": [[lay, h] for lay, h in self.heads], "threshold": self.threshold,
                "share": self.share_above(), "exactly_zero": float((self.scores == 0).float().mean()),
                "top": [[lay, h, s] for lay, h, s in self.top(10)],
                "n_trials": len(self.answered), "n_answered": self.n_answered,
                "path": self.work.get("path"), "why": self.work.get("why"),
                "attention_path": self.work.get("attention_path")}  # fmt: skip


def retrieval_scores(model: Model, batches: TaskBatch | Sequence[TaskBatch], *,
                     needle_spans: Sequence[Any] | None = None, max_new_tokens: int | None = None,
                     engine: EngineChoice = "auto", path: str = "auto", progress: bool = True
                     ) -> RetrievalScores:  # fmt: skip
    """Retrieval score of every head over needle-in-a-haystack batches (module docstring).

    Args:
        model: a bridge decoder.
        batches: one batch or several (e.g. a length x depth grid); rows of a batch must have
            equal lengths.
        needle_spans: per row ``(start, end)`` of the needle tokens (one list per batch when
            several batches); None: from the task's meta.
        max_new_tokens: tokens decoded per row (default: the row's needle length).
        engine: ``auto`` (engine if its gate passes, else hooks), ``engine`` (error if it cannot),
            ``hooks``.
        path: ``auto`` prefills by the statistics path (:mod:`~mechscope.circuits.attn_path`)
            when the patterns would exceed the memory budget; ``patterns``/``stats`` force one.
        progress: tqdm over batches.
    """
    _check_model(model)
    single = isinstance(batches, TaskBatch)
    blist: list[TaskBatch] = [batches] if isinstance(batches, TaskBatch) else list(batches)
    if not blist:
        raise InputError("no batches given; pass a TaskBatch from tasks.retrieval or text_retrieval")
    spans: list[Any] = [None] * len(blist)
    if needle_spans is not None:
        spans = [needle_spans] if single else list(needle_spans)
        if len(spans) != len(blist):
            raise InputError(f"needle_spans has {len(spans)} entries for {len(blist)} batches")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    needles = []
    for b, sp in zip(blist, spans, strict=True):
        if bool((b.real_lengths != b.seq_len).any()):
            raise InputError("rows of a batch must have equal lengths (retrieval decodes every row "
                             "from its last token); split the batch by length")  # fmt: skip
        pos = needle_positions(b, model, sp)
        steps = max_new_tokens or pos.shape[1]
        if n_ctx and b.seq_len + steps - 1 > n_ctx:
            raise InputError(f"prompt ({b.seq_len}) plus {steps} generated tokens exceed the "
                             f"model's context ({n_ctx}); use shorter prompts")  # fmt: skip
        needles.append(pos)
    t0 = time.perf_counter()
    max_steps = max(max_new_tokens or int((p >= 0).sum(1).max()) for p in needles)
    device = next(model.parameters()).device
    first_steps = max_new_tokens or needles[0].shape[1]
    eng, sf, work, first = _choose(model, engine, blist[0].clean.to(device), first_steps, path,
                                   max(b.seq_len for b in blist))  # fmt: skip
    work["gate_s"] = time.perf_counter() - t0
    per_trial, nlen, gens, nds, cells, sc = [], [], [], [], [], []
    for i, (b, pos) in enumerate(tqdm(list(zip(blist, needles, strict=True)), desc="retrieval",
                                      disable=not progress)):  # fmt: skip
        lens = (pos >= 0).sum(1)
        row_steps = torch.full_like(lens, max_new_tokens) if max_new_tokens else lens
        steps = int(row_steps.max())
        tokens = b.clean.to(device)
        with torch.no_grad():
            out = (first if i == 0 and first is not None else _decode_engine(eng, tokens, steps, sf)
                   if eng is not None else _decode_hooks(model, tokens, steps))  # fmt: skip
        gen, arg, clean = out[0].cpu(), out[1].cpu(), b.clean.cpu()
        copied = torch.zeros(*arg.shape[1:], pos.shape[1], dtype=torch.bool)
        counts = torch.full((len(clean), max_steps), -1, dtype=torch.long)
        for s in range(steps):
            live = (s < row_steps)[:, None, None, None]
            ev = copy_events(arg[s], gen[:, s], pos, clean) & live
            copied |= ev
            counts[:, s] = torch.where(s < row_steps, ev.any(-1).flatten(1).sum(1), -1)
        per_trial.append(copied.sum(-1))
        nlen.append(lens)
        sc.append(counts)
        for r in range(len(clean)):
            gens.append(gen[r, : int(row_steps[r])].tolist())
            nds.append(clean[r, pos[r][pos[r] >= 0]].tolist())
            cells.append({"batch": i, "row": r, "context_len": b.seq_len,
                          "depth": b.meta.get("depth")})  # fmt: skip
    recall = rouge1_recall(gens, nds)
    answered, pt, nl = recall > 0.5, torch.cat(per_trial), torch.cat(nlen)
    frac = pt.float() / nl[:, None, None].float()
    scores = frac[answered].mean(0) if bool(answered.any()) else torch.zeros(pt.shape[1:])
    work["seconds"] = time.perf_counter() - t0
    config = {"n_batches": len(blist), "max_new_tokens": max_new_tokens, "engine": engine,
              "path": path}
    return RetrievalScores(provenance=Provenance.of(model, config, seed=blist[0].seed), scores=scores,
                           per_trial=pt, needle_len=nl, answered=answered, recall=recall,
                           generations=gens, needles=nds, step_copies=torch.cat(sc), cells=cells,
                           work=work)  # fmt: skip


def _zoo_vocab(model: Model) -> tuple[Any, int]:
    """The retrieval vocabulary and eval length for a model without a tokenizer."""
    from mechscope.models.loading import spec_of
    from mechscope.models.zoo import RECIPES
    from mechscope.models.zoo.data import retrieval_vocab
    from mechscope.tasks.retrieval import RetrievalVocab

    recipe = RECIPES.get((spec_of(model) or "").removeprefix("zoo:"))
    if recipe is not None and recipe.task == "retrieval":
        return retrieval_vocab(recipe), int(recipe.task_args["eval_len"])
    return RetrievalVocab.for_vocab(int(model.cfg.d_vocab)), min(256, int(model.cfg.n_ctx))


def retrieval_grid_scores(model: Model, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                          *, n: int = 1, seed: int = 0, engine: EngineChoice = "auto",
                          path: str = "auto", max_new_tokens: int | None = None, progress: bool = True,
                          **task_kwargs: Any) -> RetrievalScores:  # fmt: skip
    """Scores over :func:`~mechscope.tasks.retrieval_grid` (lengths x depths, ``n`` prompts a
    cell), averaged over the answered trials of the whole grid. ``tokenizer`` None: the synthetic
    task (``vocab`` defaults to the zoo recipe's or one fitting ``d_vocab``)."""
    from mechscope.tasks import retrieval_grid

    if tokenizer is None and "vocab" not in task_kwargs:
        task_kwargs["vocab"] = _zoo_vocab(model)[0]
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0) or None
    batches = list(retrieval_grid(lengths, depths, n=n, seed=seed, tokenizer=tokenizer, n_ctx=n_ctx,
                                  **task_kwargs))  # fmt: skip
    return retrieval_scores(model, batches, engine=engine, path=path, max_new_tokens=max_new_tokens,
                            progress=progress)  # fmt: skip


# -- default run -------------------------------------------------------------------------------


def _prompt_batch(model: Model, prompts: list[Any], needle: str | list[int]) -> list[tuple[TaskBatch, Any]]:
    from mechscope.tasks._text import as_tokenizer, bos_prefix, encode

    ids_given = isinstance(needle, list)  # token ids: prompts are id lists, used as they are
    tok, out = None if ids_given else as_tokenizer(model), []
    for p in prompts:
        if ids_given != (isinstance(p, list)):
            raise InputError("give the prompts and the needle both as text or both as token ids")
        ids, found = list(p) if ids_given else bos_prefix(tok, True) + encode(tok, p), None
        for cand in [needle] if isinstance(needle, list) else [encode(tok, " " + needle.lstrip()), encode(tok, needle)]:
            if len(cand) > len(ids):
                raise InputError(f"the needle ({len(cand)} tokens) is longer than the prompt "
                                 f"({len(ids)} tokens); give a needle that occurs in the prompt")  # fmt: skip
            hits = [s for s in range(len(ids) - len(cand) + 1) if ids[s : s + len(cand)] == cand]
            if hits and cand:
                found = (hits[0], hits[0] + len(cand))
                break
        if found is None:
            raise InputError(f"the needle {needle!r} does not occur in the prompt {p[:60]!r}; "
                             "--needle must be copied from the prompt")  # fmt: skip
        t = torch.tensor([ids])
        out.append((TaskBatch(task="prompt", clean=t, corrupt=t, answer=t[:, found[0]],
                              corrupt_answer=t[:, found[0]], answer_pos=torch.tensor([len(ids) - 1]),
                              seed=0, meta={"context_len": len(ids), "depth": None}), found))  # fmt: skip
    return out


def default_run(model: Model, *, prompts: list[Any] | None = None, task: str | None = None,
                n: int | None = None, seed: int = 0, progress: bool = True,
                needle: str | list[int] | None = None, path: str = "auto") -> RetrievalScores:  # fmt: skip
    """What ``mechscope heads retrieval`` runs.

    - ``prompts`` with ``needle`` (text of each prompt the model should reproduce; or id lists
      and the needle's ids), each prompt ending where the needle is asked for.
    - a model with a tokenizer: ``text_retrieval`` on the stdlib-docstring haystack, lengths
      256 and 512 x depths 0.1, 0.5, 0.9, ``n`` (default 1) prompts a cell.
    - otherwise (zoo): ``tasks.retrieval`` with the recipe's vocabulary and eval length, 11
      depths, ``n`` (default 66) prompts in all.
    """
    if prompts:
        if not needle:
            raise InputError("scoring retrieval heads on your prompts needs the needle: pass "
                             "--needle TEXT (text of the prompt the model must reproduce), or use "
                             "--task retrieval for the built-in haystack")  # fmt: skip
        pairs = _prompt_batch(model, prompts, needle)
        return retrieval_scores(model, [b for b, _ in pairs], needle_spans=[[s] for _, s in pairs],
                                path=path, progress=progress)  # fmt: skip
    if task not in (None, "retrieval", "text_retrieval", "retrieval_text"):
        raise InputError(f"task {task!r} has no needle; use --task retrieval (or retrieval_text)")
    if n is not None and n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    if (tok := getattr(model, "tokenizer", None)) is not None:
        return retrieval_grid_scores(model, tok, [256, 512], [0.1, 0.5, 0.9], n=n or 1, seed=seed,
                                     path=path, progress=progress)  # fmt: skip
    from mechscope.tasks import retrieval

    vocab, length = _zoo_vocab(model)
    depths = [i / 10 for i in range(11)]
    per = max(1, (n or 66) // len(depths))
    batches = [retrieval(per, context_len=length, depth=d, seed=seed + i, vocab=vocab,
                         n_ctx=int(model.cfg.n_ctx)) for i, d in enumerate(depths)]  # fmt: skip
    return retrieval_scores(model, batches, path=path, progress=progress)


def __getattr__(name: str) -> Any:  # masking validation lives in .retrieval_masking now
    if name in ("MaskingResult", "masking_validation"):
        from mechscope.circuits import retrieval_masking

        return getattr(retrieval_masking, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
