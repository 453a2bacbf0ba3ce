"""Circuits from discrete sparse autoencoders (O'Neill & Bui 2024; METHODS.md section 5).

Positive prompts (the model predicts the answer) and minimally changed negatives (it cannot).
Every head's output in residual space (the tracer's ``head_resid`` site, ``z @ W_O``) is
averaged over each prompt's real positions (``reduce="mean"``, the paper's input; ``"answer"``
takes each prompt's last real position instead, where every built-in task's answer is predicted), giving one row per (prompt, head). One SAE
(:class:`~mechscope.circuits.sae_model.DiscreteSAE`, trained by
:func:`~mechscope.circuits.sae_train.train_sae`) is shared by all heads and trained on the rows of
only ``n_train`` prompts drawn from positives and negatives together (the paper: 5-10); the code
of a (prompt, head) is its most active feature (-1 when none fires). Then, over all prompts:

- node score of head h = the number of codes h takes on some positive and on no negative;
- edge score of heads (h1, h2) = the number of code pairs (c1, c2) the two take together on some
  positive and never together on a negative.

Heads are ranked by node score, head pairs by edge score. A head whose output does not depend on
what separates positives from negatives takes the same codes on both and scores 0.

A :class:`~mechscope.tasks.TaskBatch` gives minimal pairs: clean rows are the positives and
corrupt rows the negatives; a pair is kept when the model predicts the answer on the clean row
and does not on the corrupt row, and at least 2 pairs must remain. With ``reduce="mean"`` a
positional mean differs by length alone, so prompts given as two lists must have the same token
lengths on both sides (as minimal pairs do).

Defaults (the paper's): 200 features, L1 weight 0.02, Adam 1e-3, 500 full-batch epochs, 10
training prompts; inputs are rescaled to a mean norm of sqrt(d_model) first (see
:mod:`~mechscope.circuits.sae_train`).

>>> node_scores(torch.tensor([[1, 2], [3, 2]]), torch.tensor([[1, 2], [1, 2]])).tolist()
[1.0, 0.0]
>>> edge_scores(torch.tensor([[1, 2]]), torch.tensor([[1, 5]]))[0, 1].item()
1.0
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.circuits.sae_model import DiscreteSAE
from mechscope.circuits.sae_train import train_sae
from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap
from mechscope.results import Provenance, Result
from mechscope.tasks.base import TaskBatch
from mechscope.types import Model

REDUCE = ("mean", "answer")
#: The most heads :meth:`SAECircuit.circuit` keeps by default (its graph stays readable).
GRAPH_HEADS = 12


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """What :func:`sae_circuit` runs (defaults: O'Neill & Bui).

    Attributes:
        n_features: SAE dictionary size.
        l1: weight of the L1 sparsity term.
        lr: Adam learning rate.
        epochs: full-batch training steps.
        n_train: prompts the SAE is trained on, drawn (seeded) from positives and negatives.
        seed: seeds the draw and the SAE's initialisation.
        normalize: rescale inputs to a mean norm of sqrt(d_model) before the SAE.
        reduce: ``mean`` over each prompt's real positions, or ``answer``: the last real position.
        batch_size: prompts per traced forward.
    """

    n_features: int = 200
    l1: float = 0.02
    lr: float = 1e-3
    epochs: int = 500
    n_train: int = 10
    seed: int = 0
    normalize: bool = True
    reduce: str = "mean"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.reduce not in REDUCE:
            raise InputError(f"reduce must be one of {REDUCE}, got {self.reduce!r}")
        for name in ("n_features", "epochs", "n_train", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")


# -- scores ------------------------------------------------------------------------------------


def _present(codes: Int[Tensor, "n heads"], n_codes: int) -> Tensor:
    """``[heads, n_codes + 1]`` booleans: which codes (shifted by one, -1 -> 0) each head takes."""
    out = torch.zeros(codes.shape[1], n_codes + 1, dtype=torch.bool)
    out.scatter_(1, (codes.T + 1).long(), True)
    return out


def node_scores(codes_pos: Int[Tensor, "n_pos heads"],
                codes_neg: Int[Tensor, "n_neg heads"]) -> Float[Tensor, " heads"]:  # fmt: skip
    """Per head, the number of codes it takes on some positive and on no negative."""
    if codes_pos.shape[1:] != codes_neg.shape[1:]:
        raise InputError(f"positive and negative codes cover {codes_pos.shape[1:]} and "
                         f"{codes_neg.shape[1:]} heads")  # fmt: skip
    n = int(max(int(codes_pos.max()), int(codes_neg.max()), 0)) + 1
    pos, neg = _present(codes_pos, n), _present(codes_neg, n)
    return (pos & ~neg).sum(1).float()


def edge_scores(codes_pos: Int[Tensor, "n_pos heads"],
                codes_neg: Int[Tensor, "n_neg heads"]) -> Float[Tensor, "heads heads"]:  # fmt: skip
    """Per pair of heads, the number of code pairs taken together on some positive and never
    together on a negative (symmetric, zero diagonal)."""
    heads = codes_pos.shape[1]
    base = int(max(int(codes_pos.max()), int(codes_neg.max()), 0)) + 2  # codes -1..max -> 0..
    pair = torch.arange(heads * heads, dtype=torch.long).view(heads, heads)

    def keys(codes: Tensor) -> Tensor:
        c = codes.long() + 1
        joint = c[:, :, None] * base + c[:, None, :]  # [n, heads, heads]
        return torch.unique((pair[None] * base * base + joint).reshape(-1))

    kp, kn = keys(codes_pos), keys(codes_neg)
    only = kp[~torch.isin(kp, kn)]
    out = torch.bincount(only // (base * base), minlength=heads * heads).float().view(heads, heads)
    out.fill_diagonal_(0.0)
    return out


# -- inputs ------------------------------------------------------------------------------------


def _rows(model: Model, prompts: Any, what: str) -> list[list[int]]:
    """Prompts (texts, token-id rows or a [batch, pos] tensor) as real-length id lists."""
    from mechscope.probes.tokens import tokenize

    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and len(prompts) == 0):
        raise InputError(f"{what} must be a list of prompts (texts or token ids), got "
                         f"{'one string' if isinstance(prompts, str) else 'an empty list'}")  # fmt: skip
    tokens, lengths = tokenize(model, prompts)
    return [tokens[i, : int(lengths[i])].tolist() for i in range(tokens.shape[0])]


def head_inputs(model: Model, rows: list[list[int]], *, reduce: str = "mean",
                batch_size: int = 16, progress: bool = True) -> Float[Tensor, "n heads d_model"]:  # fmt: skip
    """Every head's output in residual space, reduced over positions: ``[prompt, layer*head,
    d_model]`` (heads layer-major). ``mean`` averages each row's real positions, ``answer``
    takes its last real position. Traced in batches of ``batch_size``, reduced as it goes."""
    return _head_outputs(model, rows, reduce=reduce, batch_size=batch_size, progress=progress)[0]


def _head_outputs(model: Model, rows: list[list[int]], *, reduce: str, batch_size: int,
                  progress: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`head_inputs` and, from the same forwards, each row's top-1 next token at its last
    real position."""
    from tqdm.auto import tqdm

    from mechscope.probes import Tracer

    if reduce not in REDUCE:
        raise InputError(f"reduce must be one of {REDUCE}, got {reduce!r}")
    n_layers = int(model.cfg.n_layers)
    positions = (-1,) if reduce == "answer" else None
    out, top = [], []
    starts = range(0, len(rows), batch_size)
    with Tracer(model, sites=("head_resid",), positions=positions, batch_size=batch_size,
                top_k=1) as tracer:  # fmt: skip
        for s in tqdm(starts, desc="head outputs", unit="batch", disable=not progress or len(starts) < 2,
                      leave=False):  # fmt: skip
            tr = tracer.run(rows[s : s + batch_size], progress=False)
            x = torch.stack([tr.head_resid(layer) for layer in range(n_layers)], 2).float()
            if reduce == "mean":  # [b, pos, layer, head, d]
                mask = torch.arange(x.shape[1])[None, :] < tr.lengths[:, None]
                x = (x * mask[:, :, None, None, None]).sum(1) / tr.lengths[:, None, None, None]
            else:
                x = x[:, 0]
            out.append(x.reshape(x.shape[0], -1, x.shape[-1]))
            top.append(tr.top_tokens[:, 0])
    return torch.cat(out), torch.cat(top)


def _pair_inputs(model: Model, batch: TaskBatch, config: SAEConfig,
                 progress: bool) -> tuple[Tensor, Tensor, dict[str, int]]:  # fmt: skip
    """Head outputs of the minimal pairs whose clean row the model solves and whose corrupt row
    it does not; the predictions come from the same traced forwards."""
    lengths = batch.real_lengths
    rows = [t[i, : int(lengths[i])].tolist() for t in (batch.clean, batch.corrupt)
            for i in range(batch.batch_size)]  # fmt: skip
    x, top = _head_outputs(model, rows, reduce=config.reduce, batch_size=config.batch_size,
                           progress=progress)  # fmt: skip
    b = batch.batch_size
    if bool((batch.answer_pos == lengths - 1).all()):
        pred_clean, pred_corrupt = top[:b], top[b:]
    else:  # an answer before the last token: its logits need their own forward
        with torch.no_grad():
            pred_clean = batch.answer_logits(model(batch.clean.to(_device(model)))).argmax(-1).cpu()
            pred_corrupt = (
                batch.answer_logits(model(batch.corrupt.to(_device(model)))).argmax(-1).cpu()
            )
    solved = pred_clean == batch.answer
    keep = solved & (pred_corrupt != batch.answer)
    counts = {"pairs": b, "clean_solved": int(solved.sum()),
              "corrupt_solved": int((pred_corrupt == batch.answer).sum()), "kept": int(keep.sum())}  # fmt: skip
    if counts["clean_solved"] == 0:
        raise InputError(f"the model cannot solve task {batch.task!r}: it predicts the answer on 0 "
                         f"of {b} clean prompts. SAE circuits need positives the "
                         "model solves; pick a task it solves (a zoo model solves its own task: "
                         "`mechscope zoo list`)")  # fmt: skip
    if counts["kept"] < 2:
        raise InputError(f"only {counts['kept']} of {b} pairs of task {batch.task!r} "
                         f"are usable (the model solves {counts['clean_solved']} clean rows and "
                         f"also answers {counts['corrupt_solved']} corrupt rows with the clean "
                         "answer); at least 2 are needed: give more prompts (--n) or a task the "
                         "model solves more reliably")  # fmt: skip
    return x[:b][keep], x[b:][keep], counts


def _device(model: Model) -> torch.device:
    return next(model.parameters()).device


def _check_lists(pos: list[list[int]], neg: list[list[int]], reduce: str) -> None:
    for what, rows in (("positive", pos), ("negative", neg)):
        if len(rows) < 2:
            raise InputError(f"SAE circuits need at least 2 {what} prompts, got {len(rows)}; "
                             "give more (the paper uses tens of minimal pairs)")  # fmt: skip
    lp, ln = sorted(len(r) for r in pos), sorted(len(r) for r in neg)
    if reduce == "mean" and lp != ln:
        raise InputError(f"positive prompts have token lengths {lp} but negatives {ln}: with "
                         "reduce='mean' a head's mean output then differs by length alone. Give "
                         "minimal pairs of equal token length (e.g. names of one token each), "
                         "or use reduce='answer'")  # fmt: skip


# -- result ------------------------------------------------------------------------------------


def _label(i: int, n_heads: int) -> str:
    return f"L{i // n_heads}H{i % n_heads}"


@dataclass(frozen=True, kw_only=True, eq=False)
class SAECircuit(Result):
    """Node and edge scores of discrete-SAE circuit discovery (see the module docstring).

    Attributes:
        node_scores: ``[layer, head]``: codes each head takes only on positives.
        edge_scores: ``[layer*head, layer*head]`` (layer-major): code pairs only on positives.
        codes_pos, codes_neg: ``[prompt, layer*head]`` codes (-1: no feature active).
        sae_state: the trained SAE's weights (:meth:`sae` rebuilds it).
        fit: how training went (epochs, rows, loss, mse, l1, fve, scale, alive features).
        pairs: for a task batch, how many pairs it had, how many clean rows the model solved,
            how many corrupt rows it answered with the clean answer, how many were kept.
        task: the task name (None for prompt lists).
        reduce: how positions were reduced.
        runtime: seconds: ``trace_s``, ``train_s``, ``score_s``, ``total_s``.
    """

    kind = "sae_circuit"
    node_scores: Float[Tensor, "layer head"]
    edge_scores: Float[Tensor, "pair pair"]
    codes_pos: Int[Tensor, "n_pos pair"]
    codes_neg: Int[Tensor, "n_neg pair"]
    sae_state: dict[str, Tensor]
    fit: dict[str, float]
    pairs: dict[str, int] = field(default_factory=dict)
    task: str | None = None
    reduce: str = "mean"
    runtime: dict[str, float] = field(default_factory=dict)

    @property
    def n_heads(self) -> int:
        return int(self.node_scores.shape[1])

    def sae(self) -> DiscreteSAE:
        """The trained SAE."""
        return DiscreteSAE.from_state(self.sae_state)

    def ranked_heads(self) -> list[tuple[int, int, float]]:
        """Every head as ``(layer, head, score)``, best first (ties in layer-major order)."""
        flat = self.node_scores.reshape(-1).double()
        order = torch.sort(flat, descending=True, stable=True).indices.tolist()
        return [(i // self.n_heads, i % self.n_heads, float(flat[i])) for i in order]

    def ranked_edges(self, k: int = 20) -> list[tuple[tuple[int, int], tuple[int, int], float]]:
        """The ``k`` best head pairs ``((l1, h1), (l2, h2), score)`` with a positive score,
        each pair once (lower index first)."""
        e = torch.triu(self.edge_scores.double(), diagonal=1)
        flat = e.reshape(-1)
        order = torch.sort(flat, descending=True, stable=True).indices[: max(k, 0)].tolist()
        n, h = e.shape[0], self.n_heads
        return [((i // n // h, i // n % h), (i % n // h, i % n % h), float(flat[i]))
                for i in order if float(flat[i]) > 0]  # fmt: skip

    def circuit(self, k: int | None = None, *, edges: int = 20) -> Any:
        """The top-``k`` heads (default: every head with a positive score, at most
        :data:`GRAPH_HEADS`) as a :class:`~mechscope.circuits.graph.Circuit`, with the best
        ``edges`` edges among them. On a large model most heads take some code only on
        positives (SmolLM2 IOI: 190 of 270), so the default keeps the best few."""
        from mechscope.circuits.graph import Circuit

        if k is None:
            k = min(GRAPH_HEADS, int((self.node_scores > 0).sum()))
        return Circuit.from_scores(self.node_scores, k=k, edge_scores=self.edge_scores,
                                   max_edges=edges, method="discrete SAE",
                                   provenance=self.provenance)  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        """One row per head: ``layer, head, score, rank`` (1 = best), and how many distinct
        codes it took on positives and on negatives."""
        n_layers, n_heads = self.node_scores.shape
        rank = {(ly, h): r + 1 for r, (ly, h, _) in enumerate(self.ranked_heads())}

        def distinct(codes: Tensor) -> list[int]:
            return [len(set(codes[:, i].tolist())) for i in range(codes.shape[1])]

        return pd.DataFrame({
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "score": self.node_scores.double().reshape(-1).numpy(),
            "rank": [rank[(i // n_heads, i % n_heads)] for i in range(n_layers * n_heads)],
            "codes_pos": distinct(self.codes_pos), "codes_neg": distinct(self.codes_neg),
        })  # fmt: skip

    def figure(self, view: str = "nodes") -> go.Figure:
        """``nodes``: layer x head heatmap of node scores; ``edges``: the head x head edge
        scores; ``graph``: the circuit graph of :meth:`circuit`."""
        if view == "nodes":
            return layer_head_heatmap(self.node_scores, title="discrete-SAE node score "
                                      "(codes used only on positives)")  # fmt: skip
        if view == "edges":
            names = [_label(i, self.n_heads) for i in range(self.edge_scores.shape[0])]
            fig = go.Figure(go.Heatmap(z=self.edge_scores.tolist(), x=names, y=names,
                                       colorscale="Viridis",
                                       hovertemplate="%{y} & %{x}: %{z}<extra></extra>"))  # fmt: skip
            fig.update_layout(title="discrete-SAE edge score (code pairs only on positives)")
            fig.update_yaxes(autorange="reversed")
            return fig
        if view == "graph":
            return self.circuit().figure()
        raise InputError(f"view must be 'nodes', 'edges' or 'graph', got {view!r}")

    def payload(self, k: int = 20) -> dict[str, Any]:
        """The ``--json`` body of ``mechscope circuits sae``."""
        ranked = self.ranked_heads()
        return {
            "scores": self.node_scores.tolist(),
            "heads": [[ly, h] for ly, h, s in ranked if s > 0][:k],
            "ranked": [[ly, h, s] for ly, h, s in ranked[:k]],
            "edges": [[a[0], a[1], b[0], b[1], s] for a, b, s in self.ranked_edges(k)],
            "n_positive": int(self.codes_pos.shape[0]), "n_negative": int(self.codes_neg.shape[0]),
            "pairs": dict(self.pairs), "task": self.task, "reduce": self.reduce,
            "sae": {k2: (None if isinstance(v, float) and not np.isfinite(v) else v)
                    for k2, v in self.fit.items()},
            "runtime": dict(self.runtime),
        }  # fmt: skip


# -- the method --------------------------------------------------------------------------------


def sae_circuit(
    model: Model,
    task_or_pair: TaskBatch | tuple[Any, Any],
    *,
    config: SAEConfig | None = None,
    progress: bool = True,
    **fields: Any,
) -> SAECircuit:
    """Discrete-SAE circuit discovery on one model (see the module docstring).

    Args:
        model: the model.
        task_or_pair: a :class:`~mechscope.tasks.TaskBatch` (clean rows positive, corrupt rows
            negative; pairs the model does not solve are dropped) or ``(positives, negatives)``
            prompt lists (texts, token-id rows or ``[batch, pos]`` tensors), used as given.
        config: an :class:`SAEConfig`; or give its fields as keyword arguments.
        progress: progress bars on stderr.

    Raises:
        InputError: fewer than 2 positives or negatives (after dropping unsolved pairs), a task
            the model does not solve at all, prompt lists whose token lengths differ between
            the sides with ``reduce="mean"``, bad prompts (empty, too long, unknown ids).
    """
    cfg = replace(config or SAEConfig(), **fields)
    t0 = time.perf_counter()
    task_name: str | None = None
    pairs: dict[str, int] = {}
    if isinstance(task_or_pair, TaskBatch):
        task_name = task_or_pair.task
        x_pos, x_neg, pairs = _pair_inputs(model, task_or_pair, cfg, progress)
    elif isinstance(task_or_pair, tuple) and len(task_or_pair) == 2:
        pos = _rows(model, task_or_pair[0], "positives")
        neg = _rows(model, task_or_pair[1], "negatives")
        _check_lists(pos, neg, cfg.reduce)
        x = head_inputs(model, pos + neg, reduce=cfg.reduce, batch_size=cfg.batch_size,
                        progress=progress)  # fmt: skip
        x_pos, x_neg = x[: len(pos)], x[len(pos) :]
    else:
        raise InputError("give a TaskBatch or a (positives, negatives) pair of prompt lists")
    trace_s = time.perf_counter() - t0
    result = discover(x_pos, x_neg, n_heads=int(model.cfg.n_heads), config=cfg,
                      progress=progress, provenance=Provenance.of(model, cfg, seed=cfg.seed))  # fmt: skip
    runtime = {"trace_s": trace_s, **result.runtime}
    runtime["total_s"] = time.perf_counter() - t0
    return replace(result, pairs=pairs, task=task_name, runtime=runtime)


def discover(
    x_pos: Float[Tensor, "n_pos heads d"],
    x_neg: Float[Tensor, "n_neg heads d"],
    *,
    n_heads: int,
    config: SAEConfig | None = None,
    progress: bool = True,
    provenance: Provenance | None = None,
) -> SAECircuit:
    """The method on head outputs already reduced over positions (:func:`head_inputs`):
    ``[prompt, layer*head, d_model]`` rows of positives and negatives, heads layer-major.
    Trains the SAE on ``config.n_train`` prompts drawn from both, codes every row, scores."""
    cfg = config or SAEConfig()
    if x_pos.ndim != 3 or x_neg.shape[1:] != x_pos.shape[1:]:
        raise InputError(f"head outputs must be [prompt, layer*head, d_model] on both sides, got "
                         f"{tuple(x_pos.shape)} and {tuple(x_neg.shape)}")  # fmt: skip
    if n_heads < 1 or x_pos.shape[1] % n_heads:
        raise InputError(
            f"{x_pos.shape[1]} head rows are not a whole number of layers of {n_heads}"
        )
    for what, xs in (("positive", x_pos), ("negative", x_neg)):
        if xs.shape[0] < 2:
            raise InputError(f"SAE circuits need at least 2 {what} prompts, got {xs.shape[0]}")
    t0 = time.perf_counter()
    x = torch.cat([x_pos, x_neg]).float().cpu()
    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx = torch.randperm(x.shape[0], generator=gen)[: cfg.n_train]
    sae, fit = train_sae(x[train_idx].reshape(-1, x.shape[-1]), n_features=cfg.n_features,
                         l1=cfg.l1, lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed,
                         normalize=cfg.normalize, progress=progress)  # fmt: skip
    t_train = time.perf_counter()
    codes = sae.codes(x)
    cp, cn = codes[: x_pos.shape[0]], codes[x_pos.shape[0] :]
    nodes = node_scores(cp, cn).view(-1, n_heads)
    edges = edge_scores(cp, cn)
    t_end = time.perf_counter()
    fit_d = {k: float(v) for k, v in vars(fit).items()}
    fit_d["n_train_prompts"] = float(len(train_idx))
    runtime = {"train_s": t_train - t0, "score_s": t_end - t_train, "total_s": t_end - t0}
    return SAECircuit(provenance=provenance or Provenance.of(None, cfg, seed=cfg.seed),
                      node_scores=nodes, edge_scores=edges, codes_pos=cp, codes_neg=cn,
                      sae_state=sae.state(), fit=fit_d, reduce=cfg.reduce,
                      runtime=runtime)  # fmt: skip


# -- built-in inputs ---------------------------------------------------------------------------


def _concat(batches: list[TaskBatch]) -> TaskBatch:
    """One batch from several (right-padded to the widest, lengths kept)."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.seq_len for b in batches)

    def pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    b0 = batches[0]
    cat = {name: torch.cat([getattr(b, name) for b in batches])
           for name in ("answer", "corrupt_answer", "answer_pos", "real_lengths")}  # fmt: skip
    return TaskBatch(task=b0.task, clean=torch.cat([pad(b.clean) for b in batches]),
                     corrupt=torch.cat([pad(b.corrupt) for b in batches]), answer=cat["answer"],
                     corrupt_answer=cat["corrupt_answer"], answer_pos=cat["answer_pos"],
                     seed=b0.seed, lengths=cat["real_lengths"],
                     meta={"batches": len(batches)})  # fmt: skip


TEXT_TASKS = ("ioi", "induction", "retrieval_text")


def task_batch(
    model: Model, task: str | None = None, n: int | None = None, seed: int = 0
) -> TaskBatch:
    """The minimal pairs SAE circuits use on a model by default.

    - a zoo model: its own task with the corruption its ground truth was measured with
      (``mechscope.models.zoo.data.PATCH_BATCHES``; ``n`` default 64): induction -> the first
      copy of R permuted (with :func:`~mechscope.tasks.induction`'s own fresh second half the
      previous-token heads cannot differ, and neither can the SAE's codes: node ROC-AUC 0.39
      against 0.78, mean of 10 seeds), ioi -> synthetic IOI (S2 flipped to IO), retrieval -> a
      new needle value, facts -> another subject;
    - a model with a tokenizer: ``ioi`` (default; text IOI with single-token names, ABC
      negatives: three different names, so no indirect object; ``n`` default 32), ``induction``
      (R of 10 tokens) or ``retrieval_text`` (stdlib-docstring haystacks of 128 tokens).
    """
    from mechscope.models.loading import spec_of

    spec = spec_of(model) or ""
    if spec.startswith("zoo:"):
        from mechscope.models.zoo.data import PATCH_BATCHES
        from mechscope.models.zoo.recipes import RECIPES

        recipe = RECIPES[spec[4:]]
        if task not in (None, recipe.task):
            raise InputError(f"{spec} was trained on task {recipe.task!r} only; run it with "
                             f"--task {recipe.task} (or no --task)")  # fmt: skip
        return _concat(PATCH_BATCHES[recipe.task](recipe, n or 64, seed))
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError("this model has no tokenizer and no built-in task: use a zoo model "
                         "(`mechscope zoo list`) or one with a tokenizer, or from Python pass "
                         "(positives, negatives) token-id lists to circuits.sae.sae_circuit")  # fmt: skip
    task = task or "ioi"
    if task == "ioi":
        from mechscope.tasks import ioi

        return ioi(tok, n or 32, seed=seed, corrupt="abc")
    if task == "induction":
        from mechscope.tasks import induction

        return induction(n or 32, seq_len=10, vocab=tok, seed=seed)
    if task == "retrieval_text":
        from mechscope.tasks import text_retrieval

        return text_retrieval(tok, n or 16, context_len=128, seed=seed)
    raise InputError(f"SAE circuits have built-in minimal pairs for tasks {', '.join(TEXT_TASKS)} "
                     f"on a text model; got {task!r}")  # fmt: skip


def default_run(model: Model, *, prompts: Any = None, task: str | None = None, n: int | None = None,
                seed: int = 0, progress: bool = True, config: SAEConfig | None = None) -> SAECircuit:  # fmt: skip
    """What ``mechscope circuits sae`` runs: ``prompts`` as ``(positives, negatives)``, else the
    model's built-in minimal pairs (:func:`task_batch`)."""
    cfg = replace(config or SAEConfig(), seed=seed)
    if prompts is not None:
        return sae_circuit(model, prompts, config=cfg, progress=progress)
    return sae_circuit(model, task_batch(model, task, n, seed), config=cfg, progress=progress)


__all__ = ["REDUCE", "SAECircuit", "SAEConfig", "default_run", "discover", "edge_scores", "head_inputs",
           "node_scores", "sae_circuit", "task_batch"]  # fmt: skip
