"""What a run shows: its sections (figures, a short table, a summary) and its head grids.

The dashboard and the HTML report both present a stored run through this module, so they show
the same things drawn by the same figure functions: every :class:`~mechscope.results.Result` in
the run (staged by a demo or a pipeline, or the one :meth:`~mechscope.results.Result.save` wrote)
with all of its figures, and, for a demo run, its plain results too (the predictions table, the
attention patterns of the first prompt, the per-head output norms).

A result that cannot be loaded (saved by an older mechscope, or by a class that is gone) becomes
a :class:`Section` whose ``skipped`` says why; so does a step the demo skipped (its
``{name}_summary`` JSON holds a ``skipped`` reason). Nothing here writes: a read-only store works.

:func:`head_grids` collects every ``[layer, head]`` score grid of a run, keyed by method, for the
cross-method agreement view (:func:`mechscope.figures.head_rank_comparison`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from mechscope.errors import MechscopeError, StoreError
from mechscope.figures import attention_pattern, layer_head_heatmap
from mechscope.results import Result, stored_results
from mechscope.store import Store

#: Readable titles of the results a demo run stages, by name.
TITLES = {
    "causal_trace": "Causal tracing",
    "patching": "Activation patching",
    "attribution": "Attribution patching",
    "sinks": "Attention sinks",
    "retrieval_heads": "Retrieval heads",
    "head_divergence": "Head divergence",
    "sae_circuit": "SAE circuit",
    "circuit_evaluation": "Circuit evaluation",
    "predictions": "Predictions",
    "attention_patterns": "Attention patterns (prompt 0)",
    "head_norms": "Head output norms",
}

#: The figure views drawn for each result class (by class name): (view, caption); view None
#: calls ``figure()`` without an argument. Classes not listed get their default figure.
VIEWS: dict[str, tuple[tuple[str | None, str], ...]] = {
    "SAECircuit": (("nodes", "node scores"), ("graph", "circuit graph")),
    "CircuitEvaluation": (("metrics", "ranking metrics per method"),
                          ("scores", "head scores per method")),
    "HeadDivergence": (("heads", "divergence per head"), ("tokens", "divergence per token")),
    "AttentionSinks": (("heads", "sink share per head"), ("tokens", "sink tokens")),
    "RetrievalScores": (("heads", "retrieval score per head"), ("trials", "copy-paste per trial")),
    "StreamingHeads": (("gates", "gate per head"), ("kv", "gate per key/value head"),
                       ("loss", "training curve")),
    "ReinforcementResult": (("metric", "metrics per condition"), ("heads", "reinforced heads")),
}  # fmt: skip

#: Readable method names of :class:`~mechscope.circuits.evaluate.CircuitEvaluation` methods.
METHOD_NAMES = {"sae": "SAE circuit", "patching": "patching", "attribution": "attribution",
                "detector": "detector"}  # fmt: skip

TABLE_ROWS = 20


@dataclass
class Section:
    """One result of a run as shown: its figures, a short table, its summary, or why it is
    missing.

    Attributes:
        name: the result's name in the run (``""`` for a run written by ``Result.save``; plain
            demo results use their own names, e.g. ``"predictions"``).
        title: a readable heading.
        kind: the result's kind (``Result.kind``), or ``"table"``/``"tensors"`` for plain results.
        figures: ``(caption, figure)`` pairs, each analysis figure once.
        table: a short table (the top rows of the result's frame), or None.
        summary: the step's JSON summary (a demo's ``{name}_summary``), or {}.
        skipped: why there is nothing to show (the step was skipped, or the result did not
            load), else None.
    """

    name: str
    title: str
    kind: str
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)
    table: pd.DataFrame | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def load_results(store: Store, run_id: str) -> dict[str, Result | str]:
    """Every result of a complete run, loaded: name -> the Result, or the reason it did not load.

    Raises:
        StoreError: no such run.
    """
    rec = store.get_run(run_id)
    out: dict[str, Result | str] = {}
    for name in stored_results(store, rec.id):
        try:
            out[name] = Result.load(store, rec.id, name or None)
        except (MechscopeError, ImportError, AttributeError, KeyError, ValueError) as exc:
            out[name] = f"could not load this result: {exc}"
    return out


def _grid(x: Any) -> np.ndarray | None:
    if isinstance(x, torch.Tensor):
        arr = x.detach().to("cpu", torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        arr = x.astype(np.float64)
    else:
        return None
    return arr if arr.ndim == 2 and arr.size else None


def _add(grids: dict[str, np.ndarray], key: str, grid: np.ndarray | None) -> None:
    if grid is None:
        return
    if key in grids:
        if grids[key].shape == grid.shape and np.array_equal(grids[key], grid, equal_nan=True):
            return
        n = 2
        while f"{key} ({n})" in grids:
            n += 1
        key = f"{key} ({n})"
    grids[key] = grid


def result_grids(result: Result) -> dict[str, np.ndarray]:
    """The ``[layer, head]`` score grids one result holds, keyed by a readable method name."""
    cls = type(result).__name__
    grids: dict[str, np.ndarray] = {}
    r: Any = result
    if cls == "SAECircuit":
        _add(grids, "SAE circuit", _grid(r.node_scores))
    elif cls == "CircuitEvaluation":
        for m in r.methods:
            _add(grids, METHOD_NAMES.get(m.name, m.name), _grid(m.scores))
    elif cls in ("PatchResult", "AttributionPatchResult"):
        if tuple(r.axes) == ("layer", "head"):
            name = "attribution" if cls == "AttributionPatchResult" else "patching"
            _add(grids, name, _grid(r.scores.abs()))
    elif cls == "RetrievalScores":
        _add(grids, "retrieval", _grid(r.scores))
    elif cls == "HeadDivergence":
        _add(grids, "divergence", _grid(r.scores))
    elif cls == "AttentionSinks":
        _add(grids, "sinks", _grid(r.scores))
    elif cls == "StreamingHeads":
        _add(grids, "streaming gates", _grid(r.head_gates))
    elif cls == "CalibrationResult":
        _add(grids, "calibration", _grid(r.scores))
    elif cls == "HeadStatistics":
        for kind, scores in r.scores.items():
            _add(grids, str(kind), _grid(scores))
    elif cls == "HeadScores":
        _add(grids, str(r.metric) or "head scores", _grid(r.scores))
    return grids


def head_grids(store: Store, run_id: str, *,
               results: Mapping[str, Result | str] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Every ``[layer, head]`` score grid in a run, keyed by a readable method name
    (``"SAE circuit"``, ``"patching"``, ``"attribution"``, ``"retrieval"``, ``"divergence"``,
    ``"sinks"``, ...), from its results (a circuit evaluation's per-method scores included; a
    method met twice with different scores gets ``" (2)"``). Higher = more important; signed
    patching effects are taken as ``|effect|``. ``results``: already loaded
    (:func:`load_results`), to avoid loading twice.

    Raises:
        StoreError: no such run.
    """
    loaded = load_results(store, run_id) if results is None else results
    grids: dict[str, np.ndarray] = {}
    for result in loaded.values():
        if isinstance(result, Result):
            for key, grid in result_grids(result).items():
                _add(grids, key, grid)
    return grids


def _title(name: str, result: Result | None) -> str:
    if name in TITLES:
        return TITLES[name]
    if name:
        return name.replace("_", " ").capitalize()
    kind = getattr(result, "kind", "") or "result"
    return str(kind).replace("_", " ").capitalize()


def short_table(frame: pd.DataFrame, rows: int = TABLE_ROWS) -> pd.DataFrame:
    """At most ``rows`` rows of a result's frame: the highest ``score`` first when it has one."""
    if len(frame) > rows and "score" in frame.columns:
        try:
            order = frame["score"].astype(float).abs().sort_values(ascending=False, kind="stable")
            frame = frame.loc[order.index]
        except (TypeError, ValueError):
            pass
    return frame.head(rows).reset_index(drop=True)


def _plain_summary(result: Result) -> dict[str, Any]:
    """A result's payload without its long parts (grids, lists of many items)."""
    payload = getattr(result, "payload", None)
    if payload is None:
        return {}
    try:
        body = payload()
    except Exception:  # noqa: BLE001 - a summary is optional; the figures still show
        return {}
    out = {}
    for key, value in body.items():
        text = json.dumps(value, default=str)
        if len(text) <= 400:
            out[str(key)] = value
    return out


def result_section(name: str, result: Result | str, summary: dict[str, Any] | None = None,
                   kind: str = "") -> Section:  # fmt: skip
    """The section of one result: every figure view of its class (:data:`VIEWS`), its top rows,
    and its summary. A figure that fails to draw is left out and named in the summary."""
    if isinstance(result, str):
        return Section(name=name, title=_title(name, None), kind=kind or "result",
                       summary=dict(summary or {}), skipped=result)  # fmt: skip
    figures: list[tuple[str, go.Figure]] = []
    failed: dict[str, str] = {}
    views = VIEWS.get(type(result).__name__, ((None, "figure"),))
    if type(result).__name__ == "HeadStatistics":
        views = tuple((str(k), f"{k} score") for k in getattr(result, "scores", {}))
    for view, caption in views:
        try:
            fig = result.figure() if view is None else result.figure(view)  # type: ignore[call-arg]
        except (MechscopeError, ValueError, IndexError, RuntimeError) as exc:
            failed[caption] = str(exc)
            continue
        figures.append((caption, fig))
    try:
        table: pd.DataFrame | None = short_table(result.to_frame())
    except (MechscopeError, ValueError) as exc:
        table, failed["table"] = None, str(exc)
    info = dict(summary) if summary else _plain_summary(result)
    if failed:
        info["figures_failed"] = failed
    return Section(name=name, title=_title(name, result), kind=str(result.kind), figures=figures,
                   table=table, summary=info)  # fmt: skip


def _summary_json(store: Store, run_id: str, names: Mapping[str, str], name: str) -> dict[str, Any]:
    key = f"{name}_summary"
    if names.get(key) != "json":
        return {}
    value = store.json(run_id, key)
    return value if isinstance(value, dict) else {"summary": value}


def pattern_figure(patterns: Mapping[str, Any], tokens: list[str], layer: int) -> go.Figure:
    """One layer's attention patterns ``[head, query, key]`` as one figure: the pattern of each
    head drawn by :func:`~mechscope.figures.attention_pattern`, a menu picks the head."""
    grid = patterns[f"layer{layer}"]
    n_heads, n_q, n_k = grid.shape
    toks = tokens if len(tokens) == n_k else [str(i) for i in range(n_k)]
    fig = go.Figure()
    for head in range(n_heads):
        one = attention_pattern(grid[head], toks, title=f"L{layer}H{head}")
        trace = one.data[0]
        trace.visible = head == 0
        trace.name = f"L{layer}H{head}"
        fig.add_trace(trace)
        if head == 0:
            fig.update_layout(one.layout)
    buttons = [{"label": f"head {h}", "method": "update",
                "args": [{"visible": [i == h for i in range(n_heads)]},
                         {"title": {"text": f"attention pattern L{layer}H{h}"}}]}
               for h in range(n_heads)]  # fmt: skip
    fig.update_layout(title=f"attention pattern L{layer}H0",
                      updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.15,
                                    "xanchor": "right"}] if n_heads > 1 else [])  # fmt: skip
    return fig


def _tokens(store: Store, run_id: str, names: Mapping[str, str]) -> list[list[str]]:
    if names.get("tokens") != "json":
        return []
    value = store.json(run_id, "tokens")
    if not isinstance(value, list):
        return []
    return [[str(t) for t in row] for row in value if isinstance(row, list)]


def demo_sections(store: Store, run_id: str) -> list[Section]:
    """The plain (not Result) parts of a demo run: predictions, prompt 0's attention patterns,
    the head norms, and any other plain table. Parts that are absent are left out."""
    names = store.result_names(run_id)
    if names.get("result") == "json":  # a run written by Result.save: all of it is the result
        return []
    plain = {n: k for n, k in names.items() if "." not in n}
    out: list[Section] = []
    if plain.get("predictions") == "table":
        out.append(Section(name="predictions", title=TITLES["predictions"], kind="table",
                           table=store.table(run_id, "predictions")))  # fmt: skip
    if plain.get("patterns_prompt0") == "tensors":
        patterns = store.tensors(run_id, "patterns_prompt0")
        tokens = _tokens(store, run_id, plain)
        layers = sorted(int(m.group(1)) for k in patterns if (m := re.fullmatch(r"layer(\d+)", k)))
        figs = [(f"layer {layer}", pattern_figure(patterns, tokens[0] if tokens else [], layer))
                for layer in layers]  # fmt: skip
        out.append(Section(name="attention_patterns", title=TITLES["attention_patterns"],
                           kind="tensors", figures=figs))  # fmt: skip
    if plain.get("head_norms") == "tensors":
        norms = store.tensors(run_id, "head_norms")
        figs = [(key.replace("_", " "), layer_head_heatmap(
            t, title=f"per-head output norm ({key.replace('_', ' ')})", colorscale="Viridis"))
            for key, t in norms.items() if t.ndim == 2]  # fmt: skip
        out.append(Section(name="head_norms", title=TITLES["head_norms"], kind="tensors",
                           figures=figs))  # fmt: skip
    for name, kind in plain.items():
        if kind == "table" and name != "predictions" and f"{name}.result" not in names:
            out.append(Section(name=name, title=_title(name, None), kind="table",
                               table=short_table(store.table(run_id, name))))  # fmt: skip
    return out


def sections(store: Store, run_id: str, *,
             results: Mapping[str, Result | str] | None = None) -> list[Section]:  # fmt: skip
    """Every part of a run as a :class:`Section`: the demo's plain results first (when present),
    then each stored result in name order, then the steps that were skipped (a
    ``{name}_summary`` JSON with a ``skipped`` key and no result). ``results``: already loaded
    (:func:`load_results`).

    Raises:
        StoreError: no such run, or a run that is not complete.
    """
    rec = store.get_run(run_id)
    if rec.status != "complete":
        why = f" ({rec.error})" if rec.error else ""
        raise StoreError(f"run {rec.id} is {rec.status}{why}; only a complete run can be shown")
    loaded = load_results(store, rec.id) if results is None else results
    names = store.result_names(rec.id)
    out = demo_sections(store, rec.id)
    for name, result in loaded.items():
        summary = _summary_json(store, rec.id, names, name) if name else {}
        out.append(result_section(name, result, summary, kind=rec.kind if not name else ""))
    for key in sorted(names):
        if names[key] != "json" or not key.endswith("_summary") or "." in key:
            continue
        name = key[: -len("_summary")]
        if name in loaded:
            continue
        summary = _summary_json(store, rec.id, names, name)
        if "skipped" in summary:
            out.append(Section(name=name, title=_title(name, None), kind="skipped",
                               summary=summary, skipped=str(summary["skipped"])))  # fmt: skip
    return out


def figure_count(parts: list[Section]) -> int:
    """How many figures the sections hold."""
    return sum(len(s.figures) for s in parts)


__all__ = [
    "METHOD_NAMES",
    "Section",
    "TITLES",
    "VIEWS",
    "figure_count",
    "head_grids",
    "load_results",
    "pattern_figure",
    "result_grids",
    "result_section",
    "sections",
    "short_table",
]
