"""Pure figure functions: analysis data in, a ``plotly.graph_objects.Figure`` out.

The dashboard, the HTML reports, notebooks and :meth:`mechscope.results.Result.figure` all draw
with these functions, so a figure looks the same everywhere and can be tested without a browser
(check the trace type, its ``z`` values, axis titles and hover text). Nothing here reads a store,
runs a model or writes a file.

Inputs may be torch tensors (any device or dtype) or numpy arrays; shapes use the axis vocabulary
of the package (layer, head, pos). Wrong shapes raise :class:`~mechscope.errors.InputError`
naming the mismatch.

>>> import torch
>>> fig = layer_head_heatmap(torch.zeros(2, 3), title="induction score")
>>> fig.data[0].type, fig.layout.xaxis.title.text, fig.layout.yaxis.title.text
('heatmap', 'head', 'layer')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from mechscope.errors import InputError

ArrayLike = torch.Tensor | np.ndarray


@dataclass(frozen=True, kw_only=True)
class CircuitNode:
    """A node of a circuit graph: a component (``"L1H2"``, ``"MLP3"``, ``"embed"``) at a layer."""

    name: str
    layer: int
    score: float = 0.0


@dataclass(frozen=True, kw_only=True)
class CircuitEdge:
    """A weighted edge between two nodes of a circuit graph, by name."""

    src: str
    dst: str
    weight: float = 1.0


def as_numpy(data: ArrayLike | Sequence[Any], *, ndim: int, axes: str, what: str) -> np.ndarray:
    """``data`` as a float64 numpy array of rank ``ndim``; InputError naming ``axes`` otherwise.

    >>> as_numpy(torch.ones(2, 2, dtype=torch.bfloat16), ndim=2, axes="[layer, head]", what="x")
    array([[1., 1.],
           [1., 1.]])
    """
    if isinstance(data, torch.Tensor):
        arr = data.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{what} must be a numeric {axes} array: {exc}") from exc
    if arr.ndim != ndim:
        raise InputError(f"{what} must be {axes}, got shape {tuple(arr.shape)}")
    return arr


def _check_tokens(tokens: Sequence[str], n: int, what: str) -> list[str]:
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise InputError(f"tokens has {len(tokens)} entries but {what} has {n} positions")
    return tokens


def position_labels(tokens: Sequence[str]) -> list[str]:
    """Unique axis labels ``"i: token"`` (plotly merges equal category labels).

    >>> position_labels(["a", "b", "a"])
    ['0: a', '1: b', '2: a']
    """
    return [f"{i}: {t}" for i, t in enumerate(tokens)]


def layer_head_heatmap(
    scores: ArrayLike,
    *,
    title: str = "",
    zmid: float | None = None,
    colorscale: str = "RdBu",
) -> go.Figure:
    """A ``[layer, head]`` heatmap: x = head, y = layer (layer 0 on top), hover ``L3H2: value``.

    Args:
        scores: one value per head.
        title: the figure title (say what the score is).
        zmid: the value at the colour scale's middle (0 for signed effects); None scales freely.
        colorscale: a plotly colour scale name.

    Raises:
        InputError: ``scores`` is not two-dimensional.

    >>> fig = layer_head_heatmap(torch.tensor([[0.1, 0.9]]), zmid=0.0)
    >>> fig.data[0].text[0][1], fig.data[0].zmid
    ('L0H1', 0.0)
    """
    z = as_numpy(scores, ndim=2, axes="[layer, head]", what="scores")
    n_layers, n_heads = z.shape
    labels = [[f"L{layer}H{head}" for head in range(n_heads)] for layer in range(n_layers)]
    heatmap = go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), text=labels, zmid=zmid,
        colorscale=colorscale, hovertemplate="%{text}: %{z:.4g}<extra></extra>",
    )  # fmt: skip
    fig = go.Figure(heatmap)
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
    fig.update_xaxes(tickmode="linear", dtick=1)
    fig.update_yaxes(tickmode="linear", dtick=1, autorange="reversed")
    return fig


def token_layer_heatmap(
    scores: ArrayLike,
    tokens: Sequence[str],
    *,
    title: str = "",
    zmid: float | None = None,
    colorscale: str = "RdBu",
) -> go.Figure:
    """A ``[layer, pos]`` heatmap: x = tokens (``"3: Paris"``), y = layer (layer 0 on top).

    Raises:
        InputError: ``scores`` is not two-dimensional, or ``tokens`` does not have one entry per
            position.

    >>> fig = token_layer_heatmap(torch.zeros(2, 2), ["the", "the"])
    >>> list(fig.data[0].x)
    ['0: the', '1: the']
    """
    z = as_numpy(scores, ndim=2, axes="[layer, pos]", what="scores")
    labels = position_labels(_check_tokens(tokens, z.shape[1], "scores"))
    text = [[f"layer {layer}, {label}" for label in labels] for layer in range(z.shape[0])]
    heatmap = go.Heatmap(
        z=z, x=labels, y=list(range(z.shape[0])), text=text, zmid=zmid, colorscale=colorscale,
        hovertemplate="%{text}: %{z:.4g}<extra></extra>",
    )  # fmt: skip
    fig = go.Figure(heatmap)
    fig.update_layout(title=title, xaxis_title="token", yaxis_title="layer")
    fig.update_xaxes(type="category")
    fig.update_yaxes(tickmode="linear", dtick=1, autorange="reversed")
    return fig


def attention_pattern(
    pattern: ArrayLike,
    tokens: Sequence[str],
    *,
    title: str = "",
    query_tokens: Sequence[str] | None = None,
) -> go.Figure:
    """An attention pattern ``[query, key]``: y = query token (first on top), x = key token.

    The colour scale is fixed to [0, 1] (a pattern holds probabilities), so figures of different
    heads compare at a glance.

    Args:
        pattern: attention weights of one head.
        tokens: the key tokens (and the query tokens unless ``query_tokens`` is given).
        title: the figure title (e.g. ``"L1H2"``).
        query_tokens: the query tokens, when the queries are a subset of the positions.

    Raises:
        InputError: ``pattern`` is not two-dimensional, or a token list of the wrong length.

    >>> fig = attention_pattern(torch.eye(2), ["a", "b"])
    >>> fig.data[0].text[1][0]
    'query 1: b → key 0: a'
    """
    z = as_numpy(pattern, ndim=2, axes="[query, key]", what="pattern")
    keys = position_labels(_check_tokens(tokens, z.shape[1], "the pattern's key axis"))
    if query_tokens is None:
        queries = position_labels(_check_tokens(tokens, z.shape[0], "the pattern's query axis"))
    else:
        queries = position_labels(
            _check_tokens(query_tokens, z.shape[0], "the pattern's query axis")
        )
    text = [[f"query {q} → key {k}" for k in keys] for q in queries]
    heatmap = go.Heatmap(
        z=z, x=keys, y=queries, text=text, zmin=0.0, zmax=1.0, colorscale="Blues",
        hovertemplate="%{text}: %{z:.3f}<extra></extra>",
    )  # fmt: skip
    fig = go.Figure(heatmap)
    fig.update_layout(title=title, xaxis_title="key", yaxis_title="query")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


NodeLike = CircuitNode | tuple[str, int, float]
EdgeLike = CircuitEdge | tuple[str, str, float]


def _nodes(nodes: Sequence[NodeLike]) -> list[CircuitNode]:
    out = [
        n if isinstance(n, CircuitNode) else CircuitNode(name=n[0], layer=n[1], score=n[2])
        for n in nodes
    ]
    seen: set[str] = set()
    for n in out:
        if n.name in seen:
            raise InputError(f"circuit node {n.name!r} appears twice; node names must be unique")
        seen.add(n.name)
    return out


def _edges(edges: Sequence[EdgeLike], names: set[str]) -> list[CircuitEdge]:
    out = [
        e if isinstance(e, CircuitEdge) else CircuitEdge(src=e[0], dst=e[1], weight=e[2])
        for e in edges
    ]
    for e in out:
        missing = [n for n in (e.src, e.dst) if n not in names]
        if missing:
            raise InputError(f"edge {e.src} → {e.dst} names unknown node(s) {missing}")
    return out


def layered_layout(nodes: Sequence[CircuitNode]) -> dict[str, tuple[float, float]]:
    """Node positions: x = layer, nodes of one layer spread evenly over y in [0, 1].

    >>> layered_layout([CircuitNode(name="a", layer=0), CircuitNode(name="b", layer=0)])
    {'a': (0.0, 0.0), 'b': (0.0, 1.0)}
    """
    by_layer: dict[int, list[str]] = {}
    for n in nodes:
        by_layer.setdefault(n.layer, []).append(n.name)
    pos: dict[str, tuple[float, float]] = {}
    for layer, names in by_layer.items():
        for i, name in enumerate(names):
            y = 0.5 if len(names) == 1 else i / (len(names) - 1)
            pos[name] = (float(layer), y)
    return pos


def edge_width(weight: float, max_abs: float) -> float:
    """Line width of an edge: 1 for a zero weight, 8 for the largest ``|weight|``.

    >>> edge_width(0.5, 1.0)
    4.5
    """
    return 1.0 + 7.0 * (abs(weight) / max_abs if max_abs > 0 else 0.0)


def circuit_graph(
    nodes: Sequence[NodeLike],
    edges: Sequence[EdgeLike],
    *,
    title: str = "",
    colorscale: str = "RdBu",
) -> go.Figure:
    """A circuit drawn in layers: x = layer, one line per edge (width by ``|weight|``, blue for
    positive and red for negative weights), nodes coloured by score.

    Args:
        nodes: :class:`CircuitNode` or ``(name, layer, score)`` tuples.
        edges: :class:`CircuitEdge` or ``(src, dst, weight)`` tuples, by node name.
        title: the figure title.
        colorscale: the node colour scale (centred on a score of 0).

    Returns:
        A figure with one scatter trace per edge (in the order given) and a last trace holding
        the nodes.

    Raises:
        InputError: duplicate node names, or an edge naming an unknown node.

    >>> fig = circuit_graph([("L0H1", 0, 0.5), ("L1H0", 1, 1.0)], [("L0H1", "L1H0", 0.3)])
    >>> [t.name for t in fig.data]
    ['L0H1 → L1H0', 'nodes']
    """
    node_list = _nodes(nodes)
    edge_list = _edges(edges, {n.name for n in node_list})
    pos = layered_layout(node_list)
    max_abs = max((abs(e.weight) for e in edge_list), default=0.0)
    fig = go.Figure()
    for e in edge_list:
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        label = f"{e.src} → {e.dst}"
        fig.add_trace(go.Scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", name=label, showlegend=False,
            line={"width": edge_width(e.weight, max_abs),
                  "color": "rgba(33,102,172,0.6)" if e.weight >= 0 else "rgba(178,24,43,0.6)"},
            hovertext=f"{label}: {e.weight:.4g}", hoverinfo="text",
        ))  # fmt: skip
    fig.add_trace(go.Scatter(
        x=[pos[n.name][0] for n in node_list], y=[pos[n.name][1] for n in node_list],
        mode="markers+text", name="nodes", showlegend=False,
        text=[n.name for n in node_list], textposition="top center",
        hovertext=[f"{n.name} (layer {n.layer}): {n.score:.4g}" for n in node_list],
        hoverinfo="text",
        marker={"size": 18, "color": [n.score for n in node_list], "colorscale": colorscale,
                "cmid": 0.0, "showscale": bool(node_list), "line": {"width": 1}},
    ))  # fmt: skip
    fig.update_layout(title=title, xaxis_title="layer", plot_bgcolor="white")
    fig.update_xaxes(tickmode="linear", dtick=1)
    fig.update_yaxes(visible=False)
    return fig


def head_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of every head by score, 1 = best (ties keep layer-major order; NaN heads get NaN).

    >>> head_ranks(np.array([[0.5, np.nan], [0.9, 0.5]]))
    array([[ 2., nan],
           [ 1.,  3.]])
    """
    flat = scores.reshape(-1)
    valid = ~np.isnan(flat)
    order = np.argsort(-np.where(valid, flat, -np.inf), kind="stable")
    ranks = np.full(flat.shape, np.nan)
    ranks[order[: int(valid.sum())]] = np.arange(1, int(valid.sum()) + 1)
    return ranks.reshape(scores.shape)


def head_rank_comparison(grids: Mapping[str, ArrayLike | Sequence[Any]], k: int = 10) -> go.Figure:
    """The cross-method agreement view: the same heads as ranked by each method, side by side.

    One ``[layer, head]`` panel per method (x = head, y = layer, layer 0 on top), coloured by the
    head's rank turned into a percentile (1 = the method's best head, 0 = its worst), so methods
    on different scales compare at a glance; each method's ``k`` best heads are marked with a
    cross. Hovering a cell shows the method, the head, its raw score and its rank.

    Args:
        grids: method name -> ``[layer, head]`` scores (higher = more important); every grid
            has the same shape. NaN heads (not scored) stay blank.
        k: heads marked per method (fewer when a method scores fewer heads).

    Returns:
        A figure with one heatmap per method (in the order given, sharing one colour axis)
        followed by one scatter of the top-``k`` heads per method.

    Raises:
        InputError: no grids, grids of different shapes or not two-dimensional, or ``k < 1``.

    >>> fig = head_rank_comparison({"a": [[0.1, 0.9]], "b": [[2.0, 1.0]]}, k=1)
    >>> [t.type for t in fig.data], list(fig.data[2].x), list(fig.data[3].x)
    (['heatmap', 'heatmap', 'scatter', 'scatter'], [1], [0])
    """
    from plotly.subplots import make_subplots

    if not grids:
        raise InputError("head_rank_comparison needs at least one method's [layer, head] grid")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    arrays = {str(name): as_numpy(g, ndim=2, axes="[layer, head]", what=f"the grid of {name!r}")
              for name, g in grids.items()}  # fmt: skip
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(f"every method's grid must have the same [layer, head] shape, got {shapes}")
    n_layers, n_heads = next(iter(arrays.values())).shape
    fig = make_subplots(rows=1, cols=len(arrays), subplot_titles=list(arrays),
                        horizontal_spacing=min(0.04, 0.5 / len(arrays)))  # fmt: skip
    labels = [[f"L{layer}H{head}" for head in range(n_heads)] for layer in range(n_layers)]
    marks = []
    for col, (name, z) in enumerate(arrays.items(), start=1):
        ranks = head_ranks(z)
        n_valid = int((~np.isnan(ranks)).sum())
        pct = 1.0 - (ranks - 1.0) / max(n_valid - 1, 1)
        fig.add_trace(go.Heatmap(
            z=pct, x=list(range(n_heads)), y=list(range(n_layers)), text=labels,
            customdata=np.stack([z, ranks], axis=-1), coloraxis="coloraxis", name=name,
            hovertemplate=(f"{name}<br>%{{text}}: score %{{customdata[0]:.4g}}, rank "
                           f"%{{customdata[1]}} of {n_valid}<extra></extra>"),
        ), row=1, col=col)  # fmt: skip
        top = np.argwhere(ranks <= k)
        top = top[np.argsort(ranks[top[:, 0], top[:, 1]], kind="stable")]
        marks.append((col, name, top, ranks, z))
        fig.update_xaxes(tickmode="linear", dtick=1, title_text="head", row=1, col=col)
        fig.update_yaxes(tickmode="linear", dtick=1, autorange="reversed", row=1, col=col)
    for col, name, top, ranks, z in marks:
        fig.add_trace(go.Scatter(
            x=[int(h) for _, h in top], y=[int(layer) for layer, _ in top], mode="markers",
            name=f"{name} top {k}", showlegend=False,
            marker={"symbol": "x", "size": 9, "color": "black"},
            hovertext=[f"{name}: L{layer}H{h} rank {int(ranks[layer, h])} "
                       f"(score {z[layer, h]:.4g})" for layer, h in top], hoverinfo="text",
        ), row=1, col=col)  # fmt: skip
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(
        title=f"cross-method agreement: each method's head ranks (1 = its best head; "
              f"x = its top {k})",
        coloraxis={"colorscale": "Viridis", "cmin": 0.0, "cmax": 1.0,
                   "colorbar": {"title": {"text": "rank pct"}}},
        plot_bgcolor="white",
    )  # fmt: skip
    return fig


__all__ = [
    "CircuitEdge",
    "CircuitNode",
    "as_numpy",
    "attention_pattern",
    "circuit_graph",
    "edge_width",
    "head_rank_comparison",
    "head_ranks",
    "layer_head_heatmap",
    "layered_layout",
    "position_labels",
    "token_layer_heatmap",
]
