"""Head divergence (VHD) and head reinforcement (VHR) for any context segment (METHODS.md §2).

After He et al. 2024, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
Divergence" (code jinghan1he/VHR), with the image generalised to any segment of the prompt.

- VHD[l, i] = ``||z_present - z_removed||`` of head ``i``'s output ``z`` (``hook_z``, site
  ``heads``) at the query position; ``metric="cosine"``: ``1 - cos``; ``"relative"``:
  ``||a - b|| / ||a||`` (``a`` = present). 0/0 counts as 0. T-VHD per query token = sum over layers
  of the layer's ``top_k`` head VHDs (default ``min(5, n_heads)``; the reference's k was not
  checked: its code was not reachable here).
- Segment: a token span ``(start, end)``, text (the tokens it touches), or an :class:`Injected`
  block of vectors written over the residual entering layer 0 (token + position embedding).
- Removal: ``"mask"`` keeps positions and, at every layer and head, zeroes the attention of
  queries after the segment to its keys, each row rescaled to its original mass (a row with no
  mass there is unchanged bit for bit; one with all its mass there becomes 0); ``"delete"`` drops
  the tokens (later positions shift, the query maps to its new index); ``"filler"`` writes a filler
  token over the span. Trade-offs: delete moves positions, filler still puts tokens there, mask
  leaves the segment in the residual of queries inside it.
- ``query="generated"``: greedy-decode ``n_generate`` tokens with the segment present, then run
  both sides teacher-forced on that same sequence, comparing where each token is predicted.
- VHR: per reinforced layer (the last ``round(14/32 * n_layers)``), zero the VHD of outliers
  (VHD > mean + std AND no-segment energy ``||z||^2`` > mean + std, unbiased std), keep heads
  strictly above the layer's median VHD, scale their outputs by ``alpha`` (2). Heads come from
  the first query step and stay fixed.

>>> from mechscope.models import load
>>> m = load("native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=16")
>>> hd = head_divergence(m, torch.tensor([[1, 2, 3, 4, 5, 6]]), (1, 3), progress=False)
>>> tuple(hd.scores.shape), bool((hd.scores >= 0).all())
((2, 2), True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.attribution.prompts import text_span
from mechscope.circuits.attention import by_layer, pattern_interventions
from mechscope.errors import InputError
from mechscope.figures import layer_head_heatmap, token_layer_heatmap
from mechscope.models.loading import spec_of
from mechscope.probes.interventions import Apply, Intervention, Scale, intervene
from mechscope.probes.tokens import Prompts, tokenize
from mechscope.probes.tracer import Tracer
from mechscope.results import Provenance, Result
from mechscope.tasks.base import TaskBatch, pad_id, right_pad
from mechscope.tasks.retrieval import RetrievalVocab, retrieval, text_retrieval
from mechscope.types import Model

Mode = Literal["mask", "delete", "filler"]
DivMetric = Literal["l2", "cosine", "relative"]
Span = tuple[int, int]
Head = tuple[int, int]


@dataclass(frozen=True, kw_only=True, eq=False)
class Injected:
    """A block of injected embeddings: ``vectors [n, d_model]`` replace the residual stream
    entering layer 0 at positions ``start .. start + n`` of every prompt."""

    start: int
    vectors: Float[Tensor, "n d_model"]

    @property
    def span(self) -> Span:
        return int(self.start), int(self.start) + int(self.vectors.shape[0])


Segment = str | Span | list[str] | list[Span] | Injected


# -- inputs ------------------------------------------------------------------------------------


def _rows(model: Model, prompts: Prompts) -> list[Tensor]:
    tokens, lengths = tokenize(model, prompts)
    return [tokens[i, :n] for i, n in enumerate(lengths.tolist())]


def _span(model: Model, ids: Tensor, segment: str | Span | Injected) -> Span:
    n = ids.numel()
    if isinstance(segment, str):
        if not segment.strip():
            raise InputError("the segment is empty; give its text or a (start, end) token span")
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise InputError("the segment is text but this model has no tokenizer; pass a "
                             "(start, end) token span")  # fmt: skip
        return text_span([str(tok.decode([int(i)])) for i in ids], segment, f"segment {segment!r}")
    if isinstance(segment, Injected):
        if segment.vectors.ndim != 2 or segment.vectors.shape[1] != int(model.cfg.d_model):
            raise InputError(f"injected vectors must be [n, d_model={int(model.cfg.d_model)}], got "
                             f"{tuple(segment.vectors.shape)}")  # fmt: skip
        start, end = segment.span
    elif (isinstance(segment, tuple | list) and len(segment) == 2
          and all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in segment)):  # fmt: skip
        start, end = int(segment[0]), int(segment[1])
    else:
        raise InputError(f"segment must be text, a (start, end) token span, a list of spans (one "
                         f"per prompt) or Injected; got {segment!r}")  # fmt: skip
    if not 0 <= start < end <= n:
        raise InputError(f"segment span ({start}, {end}) is not a non-empty span inside the "
                         f"prompt's {n} tokens (0 <= start < end <= {n})")  # fmt: skip
    return start, end


def default_filler(model: Model) -> int:
    """The filler token: the tokenizer's single-token space (else its pad id); on zoo:retrieval
    the first filler id of its vocabulary."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        ids = tok(" ", add_special_tokens=False)["input_ids"]
        return int(ids[0]) if len(ids) == 1 else pad_id(tok)
    if spec_of(model) == "zoo:retrieval":
        return RetrievalVocab().filler_start  # its d_vocab=256 layout
    raise InputError("this model has no tokenizer and no known filler token; pass filler_token=")


# -- the forward passes ------------------------------------------------------------------------


def segment_mask(start: int, end: int) -> Callable[[Tensor], Tensor]:
    """The pattern change of ``mode="mask"`` (module docstring), ``[batch, head, q, k]``."""

    def fn(p: Tensor) -> Tensor:  # [batch, head, query, key]
        q, k = p.shape[-2:]
        rows = torch.arange(q, device=p.device)[:, None] + (k - q)
        cols = torch.arange(k, device=p.device)[None, :]
        keep = ~((rows >= end) & (cols >= start) & (cols < end))
        new = p * keep
        mass, left = p.sum(-1, keepdim=True), new.sum(-1, keepdim=True)
        return torch.where(left > 0, new * (mass / left.clamp_min(1e-30)), new)

    return fn


def _mask_specs(model: Model, span: Span) -> list[Intervention]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    return pattern_interventions(heads, segment_mask(*span))


def _inject_spec(inj: Injected) -> Intervention:
    start, end = inj.span

    def fn(x: Tensor) -> Tensor:  # [batch, pos, d_model]
        out = x.clone()
        out[:, start:end] = inj.vectors.to(x.device, x.dtype)
        return out

    return Apply(site="resid_pre", layer=0, fn=fn)


def _heads_at(model: Model, ids: Tensor, positions: list[int], specs: list[Intervention]
              ) -> Tensor:  # fmt: skip
    """Head outputs ``[query, layer, head, d_head]`` at ``positions`` of one prompt."""
    with contextlib.ExitStack() as stack:
        if specs:
            stack.enter_context(intervene(model, specs))
        tracer = stack.enter_context(Tracer(model, sites=("heads",)))
        _, trace = tracer.forward(ids[None])
    pos = torch.tensor(positions)
    return torch.stack([trace.heads(layer)[0, pos] for layer in range(model.cfg.n_layers)], 1)


@torch.no_grad()
def _greedy(model: Model, ids: Tensor, n: int, specs: list[Intervention]) -> Tensor:
    device = getattr(model.cfg, "device", None) or "cpu"
    out = ids.clone()
    with contextlib.ExitStack() as stack:
        if specs:
            stack.enter_context(intervene(model, specs))
        for _ in range(n):
            logits = model(out[None].to(device))
            out = torch.cat([out, logits[0, -1].argmax().cpu().view(1)])
    return out[ids.numel():]  # fmt: skip


def _divergence(a: Tensor, b: Tensor, metric: str) -> Tensor:
    diff = (a - b).norm(dim=-1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    if metric == "l2":
        return diff
    if metric == "relative":
        return torch.where(na > 0, diff / na.clamp_min(1e-30), torch.where(diff > 0, torch.inf, 0.0))  # fmt: skip
    cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-30)
    out = torch.where((na > 0) & (nb > 0), (1 - cos).clamp(0, 2), 1.0)
    return torch.where(diff > 0, out, 0.0)  # equal outputs: exactly 0


# -- the result --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadDivergence(Result):
    """VHD ``[prompt, token, layer, head]`` at every query token; ``energy``: ``||z||^2`` with
    the segment removed (the outlier rule's); ``t_vhd_layers [prompt, token, layer]``: each
    layer's top-k sum; ``spans``/``query_pos`` per prompt; ``token_labels``: prompt 0's query
    tokens (the generated ones for ``query="generated"``)."""

    kind = "head_divergence"
    vhd: Float[Tensor, "prompt token layer head"]
    energy: Float[Tensor, "prompt token layer head"]
    t_vhd_layers: Float[Tensor, "prompt token layer"]
    spans: list[tuple[int, int]]
    query_pos: list[list[int]]
    token_labels: list[str]
    mode: str
    metric: str
    query: str
    top_k: int

    @property
    def scores(self) -> Float[Tensor, "layer head"]:
        """Mean VHD over prompts and query tokens."""
        return self.vhd.mean((0, 1))

    @property
    def t_vhd(self) -> Float[Tensor, "prompt token"]:
        """T-VHD per prompt and query token."""
        return self.t_vhd_layers.sum(-1)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, head, vhd`` (mean), ``vhd_first`` (first query token),
        ``vhd_std`` (over prompts at the first token), ``energy`` (first token)."""
        n_layers, n_heads = self.scores.shape
        first = self.vhd[:, 0]
        std = first.std(0) if first.shape[0] > 1 else torch.zeros_like(first[0])
        return pd.DataFrame({
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "vhd": self.scores.double().reshape(-1).numpy(),
            "vhd_first": first.mean(0).double().reshape(-1).numpy(),
            "vhd_std": std.double().reshape(-1).numpy(),
            "energy": self.energy[:, 0].mean(0).double().reshape(-1).numpy(),
        })  # fmt: skip

    def figure(self, view: Literal["heads", "tokens"] = "heads") -> go.Figure:
        """``"heads"``: layer x head heatmap of the mean VHD; ``"tokens"``: per query token, each
        layer's top-k sum (their column sums are T-VHD)."""
        if view == "tokens":
            grid = self.t_vhd_layers.mean(0).T  # [layer, token]
            return token_layer_heatmap(grid, self.token_labels, colorscale="Viridis",
                                       title=f"T-VHD by layer (top-{self.top_k} heads per layer)")  # fmt: skip
        if view != "heads":
            raise InputError(f"view must be 'heads' or 'tokens', got {view!r}")
        return layer_head_heatmap(self.scores, colorscale="Viridis",
                                  title=f"head divergence ({self.metric}, {self.mode})")  # fmt: skip

    def top(self, k: int | None = None, rel: float = 0.1) -> list[Head]:
        """Up to ``k`` (default: heads per layer) heads of largest mean VHD, best first, each with
        at least ``rel`` of the largest (a pruned head at 1e-13 is not a top head)."""
        flat, n_heads = self.scores.reshape(-1), self.scores.shape[1]
        order, floor = torch.sort(flat, descending=True, stable=True).indices[: k or n_heads], rel * float(flat.max())
        return [(int(i) // n_heads, int(i) % n_heads) for i in order if 0 < float(flat[i]) >= floor]

    def payload(self) -> dict[str, Any]:
        """JSON body: ``scores``, ``heads`` (:meth:`top`: up to ``n_heads`` largest mean VHDs, >= 10% of the largest),
        ``vhr_heads`` (:func:`select_reinforced`, defaults), ``spans``, ``mode``, ``metric``,
        ``query``, ``t_vhd`` (mean per query token), ``tokens``."""

        def clean(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {"scores": [[clean(v) for v in row] for row in self.scores.tolist()],
                "heads": [list(h) for h in self.top()],
                "vhr_heads": [list(h) for h in select_reinforced(self)],
                "spans": [list(s) for s in self.spans], "mode": self.mode, "metric": self.metric,
                "query": self.query, "top_k": self.top_k,
                "t_vhd": [clean(v) for v in self.t_vhd.mean(0).tolist()],
                "tokens": self.token_labels}  # fmt: skip


# -- VHD ---------------------------------------------------------------------------------------


def head_divergence(
    model: Model, prompts: Prompts, segment: Segment, *, mode: Mode = "mask",
    query: Literal["last", "generated"] | int = "last", n_generate: int = 8,
    metric: DivMetric = "l2", filler_token: int | None = None, top_k: int | None = None,
    progress: bool = True,
) -> HeadDivergence:  # fmt: skip
    """VHD of every head for ``segment`` of every prompt (see the module docstring).

    Args:
        prompts: text, token ids ``[batch, pos]`` or a TaskBatch (its clean rows).
        segment: text, a ``(start, end)`` tuple, a list with one of those per prompt, or an
            :class:`Injected` block.
        query: ``"last"``, a position (negative counts from the end) or ``"generated"``.
        filler_token: for ``mode="filler"`` (default :func:`default_filler`).

    Raises:
        InputError: a segment not in a prompt or empty, a query not after the segment, an
            unknown mode/metric, or a context too short for the generated tokens.
    """
    from tqdm.auto import tqdm

    if mode not in ("mask", "delete", "filler"):
        raise InputError(f"mode must be 'mask', 'delete' or 'filler', got {mode!r}")
    if metric not in ("l2", "cosine", "relative"):
        raise InputError(f"metric must be 'l2', 'cosine' or 'relative', got {metric!r}")
    if query == "generated" and n_generate < 1:
        raise InputError(f"n_generate must be >= 1 for query='generated', got {n_generate}")
    if not (query in ("last", "generated") or (isinstance(query, int) and not isinstance(query, bool))):  # fmt: skip
        raise InputError(f"query must be 'last', 'generated' or a position, got {query!r}")
    n_heads = int(model.cfg.n_heads)
    top_k = min(5, n_heads) if top_k is None else top_k
    if not 1 <= top_k <= n_heads:
        raise InputError(f"top_k must be in 1..{n_heads} (heads per layer), got {top_k}")
    if mode == "filler" and filler_token is None:
        filler_token = default_filler(model)
    rows = _rows(model, prompts)
    segs = segment if isinstance(segment, list) else [segment] * len(rows)
    if len(segs) != len(rows):
        raise InputError(f"{len(segs)} segments for {len(rows)} prompts; give one per prompt, "
                         "or one (start, end) tuple or text for all")  # fmt: skip
    vhd, energy, spans, qpos, labels = [], [], [], [], []  # type: ignore[var-annotated]
    for i, (ids, seg) in enumerate(tqdm(list(zip(rows, segs, strict=True)), desc="vhd",
                                        disable=not progress, leave=False)):  # fmt: skip
        span = _span(model, ids, seg)
        inject = [_inject_spec(seg)] if isinstance(seg, Injected) else []
        n = ids.numel()
        if query == "generated":
            if n + n_generate - 1 > int(model.cfg.n_ctx):
                raise InputError(f"prompt {i} ({n} tokens) + {n_generate} generated tokens "
                                 f"exceed the context {int(model.cfg.n_ctx)}; generate fewer")  # fmt: skip
            gen = _greedy(model, ids, n_generate, inject)
            ext, pos, shown = (
                torch.cat([ids, gen[:-1]]),
                list(range(n - 1, n - 1 + n_generate)),
                gen,
            )
        else:
            p = n - 1 if query == "last" else int(query) % n if -n <= int(query) < n else None
            if p is None:
                raise InputError(f"query position {query} is outside prompt {i} ({n} tokens)")
            ext, pos, shown = ids, [p], ids[p : p + 1]
        tok = getattr(model, "tokenizer", None)
        labels = labels or [str(tok.decode([int(t)])) if tok else str(int(t)) for t in shown]
        if min(pos) < span[1]:
            raise InputError(f"query position {min(pos)} of prompt {i} is inside or before the "
                             f"segment {span}; VHD compares a query after the segment — move the "
                             "segment earlier or query a later position")  # fmt: skip
        present = _heads_at(model, ext, pos, inject)
        if mode == "mask":
            removed = _heads_at(model, ext, pos, inject + _mask_specs(model, span))
        elif mode == "filler":
            filled = ext.clone()
            filled[span[0]:span[1]] = int(filler_token)  # type: ignore[arg-type]  # fmt: skip
            removed = _heads_at(model, filled, pos, [])
        else:
            cut = span[1] - span[0]
            removed = _heads_at(model, torch.cat([ext[:span[0]], ext[span[1]:]]),
                                [q - cut for q in pos], [])  # fmt: skip
        vhd.append(_divergence(present.float(), removed.float(), metric))
        energy.append(removed.float().pow(2).sum(-1))
        spans.append(span), qpos.append(pos)  # type: ignore[func-returns-value]
    v = torch.stack(vhd)  # [prompt, token, layer, head]
    config = {"mode": mode, "metric": metric, "query": str(query), "n_generate": n_generate,
              "filler_token": filler_token, "top_k": top_k, "spans": [list(s) for s in spans]}  # fmt: skip
    return HeadDivergence(
        provenance=Provenance.of(model, config), vhd=v, energy=torch.stack(energy),
        t_vhd_layers=v.topk(top_k, dim=-1).values.sum(-1), spans=spans, query_pos=qpos,
        token_labels=labels, mode=mode, metric=metric, query=str(query), top_k=top_k)  # fmt: skip


# -- VHR ---------------------------------------------------------------------------------------


def reinforced_layers(n_layers: int) -> list[int]:
    """The last ``round(14/32 * n_layers)`` layers (at least one), as VHR reinforces 14 of 32.

    >>> reinforced_layers(32)[0], len(reinforced_layers(30)), reinforced_layers(2)
    (18, 13, [1])
    """
    k = max(1, round(14 / 32 * n_layers))
    return list(range(n_layers - k, n_layers))


def select_reinforced(vhd: HeadDivergence, *, layers: Sequence[int] | None = None,
                      outliers: bool = True) -> list[Head]:  # fmt: skip
    """The VHR heads: per layer, outlier heads' VHD zeroed (``outliers=False`` skips this), then
    the heads strictly above the layer's median VHD. Uses the first query token, averaged over
    prompts."""
    v = vhd.vhd[:, 0].mean(0).double()  # [layer, head]
    e = vhd.energy[:, 0].mean(0).double()
    n_layers = v.shape[0]
    layers = reinforced_layers(n_layers) if layers is None else [int(x) % n_layers for x in layers]
    out: list[Head] = []
    for layer in sorted(set(layers)):
        s = v[layer].clone()
        if outliers and s.numel() > 1:
            bad = (s > s.mean() + s.std()) & (e[layer] > e[layer].mean() + e[layer].std())
            s[bad] = 0.0
        med = float(np.median(s.numpy()))
        out += [(layer, int(h)) for h in range(s.numel()) if float(s[h]) > med]
    return out


def reinforce(heads: Sequence[Head], alpha: float = 2.0, positions: Tensor | None = None
              ) -> list[Intervention]:  # fmt: skip
    """Scale the outputs (site ``heads``) of ``heads`` by ``alpha`` (1: the identity, bit for bit).

    >>> [(s.layer, s.heads, s.factor) for s in reinforce([(3, 1), (2, 0), (3, 0)])]
    [(2, (0,), 2.0), (3, (0, 1), 2.0)]
    """
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise InputError(f"alpha must be a positive number (2 reinforces, 1 is no change), got {alpha!r}")  # fmt: skip
    return [Scale(site="heads", layer=layer, heads=hs, positions=positions, factor=float(alpha))
            for layer, hs in by_layer(heads).items()]  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class ReinforcementResult(Result):
    """Task metrics (batch means) per condition (``"base"``, ``"vhr"``, ``"random_0"``, ...):
    unreinforced, the VHR ``heads`` scaled, each draw of ``random_heads`` scaled."""

    kind = "head_reinforcement"
    conditions: list[str]
    accuracy: list[float]
    logit_diff: list[float]
    answer_prob: list[float]
    answer_prob_rows: Float[Tensor, "condition row"]
    heads: list[tuple[int, int]]
    random_heads: list[list[tuple[int, int]]]
    alpha: float
    n_layers: int
    n_heads: int

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"condition": self.conditions, "accuracy": self.accuracy,
                             "logit_diff": self.logit_diff, "answer_prob": self.answer_prob})  # fmt: skip

    def grid(self) -> Tensor:
        g = torch.zeros(self.n_layers, self.n_heads)
        g[[h[0] for h in self.heads], [h[1] for h in self.heads]] = 1.0
        return g

    def figure(self, view: Literal["metric", "heads"] = "metric") -> go.Figure:
        """``"metric"``: answer probability and accuracy per condition; ``"heads"``: the heads."""
        if view == "heads":
            return layer_head_heatmap(self.grid(), colorscale="Viridis", title="reinforced heads")
        fig = go.Figure([go.Bar(name="answer prob", x=self.conditions, y=self.answer_prob),
                         go.Bar(name="accuracy", x=self.conditions, y=self.accuracy)])  # fmt: skip
        return fig.update_layout(barmode="group", title=f"head reinforcement (alpha={self.alpha})")

    def payload(self) -> dict[str, Any]:
        """``scores`` (1 on the reinforced heads), ``heads``, and the metrics per condition."""
        return {"scores": self.grid().tolist(), "heads": [list(h) for h in self.heads],
                "alpha": self.alpha, "random_heads": [[list(h) for h in d] for d in self.random_heads],
                **{c: {"accuracy": a, "logit_diff": ld, "answer_prob": p} for c, a, ld, p in
                   zip(self.conditions, self.accuracy, self.logit_diff, self.answer_prob, strict=True)}}  # fmt: skip


def random_heads_like(heads: Sequence[Head], n_heads: int, rng: np.random.Generator) -> list[Head]:
    """As many random heads per layer as ``heads`` has there, avoiding ``heads`` when possible."""
    out: list[Head] = []
    for layer, hs in by_layer(heads).items():
        others = [h for h in range(n_heads) if h not in hs]
        pool = others if len(others) >= len(hs) else list(range(n_heads))
        out += [(layer, int(h)) for h in rng.choice(pool, size=len(hs), replace=False)]
    return sorted(out)


@torch.no_grad()
def _task_metrics(model: Model, batches: list[TaskBatch], specs_for: Any) -> tuple[float, float, Tensor]:  # fmt: skip
    device = getattr(model.cfg, "device", None) or "cpu"
    probs, diffs, hits = [], [], []
    for b in batches:
        kwargs: dict[str, Any] = {}
        if bool((b.real_lengths < b.seq_len).any()):
            kwargs["attention_mask"] = (torch.arange(b.seq_len)[None] < b.real_lengths[:, None]).long().to(device)  # fmt: skip
        with intervene(model, specs_for(b)):
            logits = model(b.clean.to(device), **kwargs).float().cpu()
        probs.append(b.answer_prob(logits)), diffs.append(b.logit_diff(logits))  # type: ignore[func-returns-value]
        hits.append(b.answer_logits(logits).argmax(-1) == b.answer)
    p = torch.cat(probs)
    return float(torch.cat(hits).float().mean()), float(torch.cat(diffs).mean()), p


def evaluate_reinforcement(
    model: Model, task_batches: TaskBatch | Sequence[TaskBatch], heads: Sequence[Head], *,
    alpha: float = 2.0, n_random: int = 3, seed: int = 0,
    positions: Literal["query", "all"] = "query", progress: bool = True,
) -> ReinforcementResult:  # fmt: skip
    """Accuracy, mean logit difference and answer probability of the task batches unreinforced,
    with ``heads`` scaled by ``alpha``, and with as many random heads per layer (``n_random``
    draws, seeded). ``positions="query"`` scales the heads at each row's ``answer_pos`` only (the
    generated step, as VHR reinforces decoding steps); ``"all"`` at every position."""
    from tqdm.auto import tqdm

    batches = [task_batches] if isinstance(task_batches, TaskBatch) else list(task_batches)
    if not batches or not heads:
        raise InputError("evaluate_reinforcement needs at least one task batch and one head")
    if positions not in ("query", "all"):
        raise InputError(f"positions must be 'query' or 'all', got {positions!r}")
    reinforce(heads, alpha)  # checks alpha
    n_heads = int(model.cfg.n_heads)
    rng = np.random.default_rng(seed)
    draws = [random_heads_like(heads, n_heads, rng) for _ in range(n_random)]
    plan: list[tuple[str, list[Head] | None]] = [("base", None), ("vhr", list(heads))]
    plan += [(f"random_{i}", d) for i, d in enumerate(draws)]
    out = []
    for _name, hs in tqdm(plan, desc="reinforce", disable=not progress, leave=False):

        def specs(b: TaskBatch, hs: list[Head] | None = hs) -> list[Intervention]:
            pos = b.answer_pos[:, None] if positions == "query" else None
            return [] if hs is None else reinforce(hs, alpha, pos)

        out.append(_task_metrics(model, batches, specs))
    acc, ld, rows = [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
    names, ap = [n for n, _ in plan], [float(r.mean()) for r in rows]
    config = {"alpha": alpha, "n_random": n_random, "positions": positions,
              "heads": [list(h) for h in heads]}  # fmt: skip
    return ReinforcementResult(
        provenance=Provenance.of(model, config, seed), conditions=names, accuracy=acc,
        logit_diff=ld, answer_prob=ap, answer_prob_rows=torch.stack(rows), heads=sorted(heads),
        random_heads=draws, alpha=float(alpha), n_layers=int(model.cfg.n_layers), n_heads=n_heads)  # fmt: skip


# -- built-in prompts and the CLI's default run ------------------------------------------------

#: (context, question, the context's answer, the known answer): contexts that contradict facts.
CONTRADICTIONS: tuple[tuple[str, str, str, str], ...] = tuple(
    (f"{q} {a}.", q, a, k) for q, a, k in (
        ("The capital of France is", "Rome", "Paris"),
        ("The Eiffel Tower is located in the city of", "London", "Paris"),
        ("The mother tongue of Angela Merkel is", "French", "German"),
        ("The iPhone is produced by", "Microsoft", "Apple"),
        ("Mount Everest is located in", "Africa", "Asia"),
        ("The Beatles were a band from", "Japan", "England")))  # fmt: skip


def context_prompt(context: str, question: str) -> str:
    """``"Context: <context>\\nQuestion: <question>"`` — the prompt layout of the built-ins."""
    return f"Context: {context}\nQuestion: {question}"


def context_task(model: Model, rows: Sequence[tuple[str, str, str, str]], seed: int = 0) -> TaskBatch:  # fmt: skip
    """A TaskBatch from ``(context, question, context answer, known answer)`` rows: ``answer`` =
    the first token of ``" " + context answer`` (accuracy = follows the context), ``corrupt_answer``
    = that of the known answer; corrupt rows equal clean rows."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError("context tasks are text; this model has no tokenizer")
    ids = _rows(model, [context_prompt(c, q) for c, q, _, _ in rows])
    first = [int(tok(" " + a, add_special_tokens=False)["input_ids"][0]) for _, _, a, _ in rows]
    known = [int(tok(" " + k, add_special_tokens=False)["input_ids"][0]) for _, _, _, k in rows]
    clean = right_pad([r.tolist() for r in ids], pad_id(tok))
    lengths = torch.tensor([r.numel() for r in ids])
    return TaskBatch(task="context", clean=clean, corrupt=clean.clone(), answer=torch.tensor(first),
                     corrupt_answer=torch.tensor(known), answer_pos=lengths - 1, seed=seed,
                     meta={"contexts": [r[0] for r in rows]}, lengths=lengths)  # fmt: skip


def default_run(model: Model, *, prompts: list[Any] | None = None, task: str | None = None,
                n: int | None = None, seed: int = 0, progress: bool = True,
                segment: str | tuple[int, int] | None = None,
                mode: Mode = "mask") -> HeadDivergence:  # fmt: skip
    """What the CLI runs: VHD at the last token, the segment removed by ``mode`` (CLI ``--mode``).

    - ``prompts`` given (texts or token ids): ``segment`` (CLI ``--segment`` text or
      ``--segment-span START:END``) is what is removed; required.
    - zoo:retrieval (or ``task="retrieval"`` on it): ``n`` (8) synthetic retrieval rows of 128
      tokens, the needle (key, value) as the segment.
    - a model with a tokenizer: ``task="retrieval"``: ``n`` (4) stdlib-docstring haystacks with
      the passcode needle as the segment; else the built-in contradicting contexts
      (:data:`CONTRADICTIONS`, first ``n``), the context sentence as the segment.
    """
    if prompts is not None:
        if not segment:
            raise InputError("prompts were given without a segment; pass segment= (CLI --segment) "
                             "with the text of the prompt whose removal is measured")  # fmt: skip
        return head_divergence(model, prompts, segment, mode=mode, progress=progress)
    if task not in (None, "retrieval", "retrieval_text", "context"):
        raise InputError(f"head divergence has built-in segments for tasks retrieval, retrieval_text (the needle) or none (contradicting contexts); got {task!r}")
    if spec_of(model) == "zoo:retrieval":
        b = retrieval(n or 8, context_len=128, seed=seed, n_ctx=int(model.cfg.n_ctx))
        spans = [(int(s), int(s) + 2) for s in b.meta["needle_start"]]
        return head_divergence(model, b.clean, spans, mode=mode, progress=progress)
    if getattr(model, "tokenizer", None) is None:
        raise InputError("this model has no built-in prompts; pass prompts (token ids) and a "
                         "segment span")  # fmt: skip
    if task in ("retrieval", "retrieval_text"):
        b = text_retrieval(model.tokenizer, n or 4, context_len=256, seed=seed)
        spans = list(zip(b.meta["needle_start"], b.meta["needle_end"], strict=True))
        return head_divergence(model, b, [(int(s), int(e)) for s, e in spans], mode=mode, progress=progress)
    rows = CONTRADICTIONS[: n or len(CONTRADICTIONS)]
    prompts = [context_prompt(c, q) for c, q, _, _ in rows]
    return head_divergence(model, prompts, [r[0] for r in rows], mode=mode, progress=progress)
