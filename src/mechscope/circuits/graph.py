"""A circuit as a graph: heads and MLP layers as nodes, weighted edges between them.

:class:`Circuit` is what a circuit-discovery method hands on: built from any scorer's per-head
scores (:meth:`Circuit.from_scores`: a ``[layer, head]`` grid, a
:class:`~mechscope.results.HeadScores`, a patching result, the SAE's node scores), optionally
with MLP scores ``[layer]`` and pairwise edge scores. Nodes are named ``L{layer}H{head}`` and
``MLP{layer}``. Edges run from the lower layer to the higher one; a pair of nodes in one layer
gets no edge (neither can read the other). It draws itself as a layered graph
(:func:`mechscope.figures.circuit_graph`) and saves to the store like every
:class:`~mechscope.results.Result`.

>>> import torch
>>> c = Circuit.from_scores(torch.tensor([[0.1, 0.9], [0.7, 0.0]]), k=2)
>>> c.heads
[(0, 1), (1, 0)]
>>> [n[0] for n in c.nodes]
['L0H1', 'L1H0']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.figures import circuit_graph
from mechscope.results import Provenance, Result

_NAME = re.compile(r"^(?:L(\d+)H(\d+)|MLP(\d+))$")


def _grid(scores: Any, what: str, ndim: int) -> np.ndarray:
    """Scores as a float64 numpy array of ``ndim`` dimensions (tensors, arrays, results)."""
    if hasattr(scores, "node_scores"):
        scores = scores.node_scores
    elif hasattr(scores, "scores"):
        scores = scores.scores
    if isinstance(scores, Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != ndim:
        raise InputError(f"{what} must have {ndim} dimension(s), got shape {arr.shape}")
    return arr


def parse_node(name: str) -> tuple[str, int, int | None]:
    """``"L1H2"`` -> ``("head", 1, 2)``, ``"MLP3"`` -> ``("mlp", 3, None)``.

    >>> parse_node("L1H2"), parse_node("MLP3")
    (('head', 1, 2), ('mlp', 3, None))
    """
    m = _NAME.match(name)
    if m is None:
        raise InputError(f"node name {name!r} is neither L<layer>H<head> nor MLP<layer>")
    if m.group(3) is not None:
        return "mlp", int(m.group(3)), None
    return "head", int(m.group(1)), int(m.group(2))


@dataclass(frozen=True, kw_only=True, eq=False)
class Circuit(Result):
    """A circuit: nodes ``(name, layer, score)`` and edges ``(src, dst, weight)`` by name.

    Attributes:
        nodes: ``("L1H2", 1, score)`` or ``("MLP3", 3, score)``, best first.
        edges: ``(src, dst, weight)`` with src in a lower layer than dst, heaviest first.
        method: what scored it (the figure's title).
        n_layers, n_heads: the model's shape.
    """

    nodes: tuple[tuple[str, int, float], ...]
    edges: tuple[tuple[str, str, float], ...] = ()
    method: str = ""
    n_layers: int
    n_heads: int

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [n[0] for n in self.nodes]
        if len(set(names)) != len(names):
            raise InputError(f"circuit nodes must be unique, got {names}")
        for name, layer, _ in self.nodes:
            kind, ly, head = parse_node(name)
            if ly != layer or not 0 <= ly < self.n_layers or (
                    head is not None and not 0 <= head < self.n_heads):  # fmt: skip
                raise InputError(f"node {name} (layer {layer}) is outside the model's "
                                 f"{self.n_layers} layers x {self.n_heads} heads")  # fmt: skip
        known = set(names)
        for src, dst, _ in self.edges:
            if src not in known or dst not in known:
                raise InputError(f"edge {src} -> {dst} names a node not in the circuit")

    @classmethod
    def from_scores(
        cls,
        scores: Any,
        *,
        k: int | None = None,
        threshold: float | None = None,
        by_abs: bool = False,
        mlp_scores: Any = None,
        edge_scores: Any = None,
        max_edges: int = 20,
        method: str = "",
        provenance: Provenance | None = None,
    ) -> Circuit:
        """The circuit of the best heads (and MLPs) of a scorer.

        Args:
            scores: ``[layer, head]`` scores (tensor, array, nested lists, or a result with
                ``scores``/``node_scores``).
            k: keep the ``k`` best heads; ``threshold``: keep heads scoring at least this; with
                neither, every head with a score > 0. Both: the best ``k`` of those above it.
            by_abs: rank and threshold by ``|score|`` (signed patching effects).
            mlp_scores: ``[layer]`` scores of MLP layers, selected by the same rule.
            edge_scores: ``[layer*head, layer*head]`` head-pair scores (layer-major, as
                :attr:`~mechscope.circuits.sae.SAECircuit.edge_scores`); the ``max_edges``
                heaviest cross-layer pairs between kept heads become edges.
            method: what scored it.
            provenance: defaults to one naming no model.
        """
        s = _grid(scores, "head scores", 2)
        n_layers, n_heads = s.shape
        if k is not None and k < 0:
            raise InputError(f"k must be >= 0, got {k}")

        def pick(vals: np.ndarray) -> list[int]:
            key = np.abs(vals) if by_abs else vals
            order = [int(i) for i in np.argsort(-key, kind="stable") if not np.isnan(key[i])]
            keep = [i for i in order if (key[i] >= threshold if threshold is not None else
                                         (k is not None or key[i] > 0))]  # fmt: skip
            return keep[:k] if k is not None else keep

        flat = s.reshape(-1)
        nodes = [
            (f"L{i // n_heads}H{i % n_heads}", i // n_heads, float(flat[i])) for i in pick(flat)
        ]
        if mlp_scores is not None:
            m = _grid(mlp_scores, "MLP scores", 1)
            if m.shape[0] != n_layers:
                raise InputError(f"MLP scores have {m.shape[0]} layers, head scores {n_layers}")
            nodes += [(f"MLP{i}", i, float(m[i])) for i in pick(m)]
        edges: list[tuple[str, str, float]] = []
        if edge_scores is not None:
            e = _grid(edge_scores, "edge scores", 2)
            if e.shape != (n_layers * n_heads,) * 2:
                raise InputError(f"edge scores must be [{n_layers * n_heads}, "
                                 f"{n_layers * n_heads}] (heads layer-major), got {e.shape}")  # fmt: skip
            kept = sorted(i for i in range(n_layers * n_heads)
                          if f"L{i // n_heads}H{i % n_heads}" in {n[0] for n in nodes})  # fmt: skip
            pairs = [(e[a, b], a, b) for a in kept for b in kept
                     if a // n_heads < b // n_heads and e[a, b] != 0]  # fmt: skip
            pairs.sort(key=lambda p: -abs(p[0]))
            edges = [(f"L{a // n_heads}H{a % n_heads}", f"L{b // n_heads}H{b % n_heads}", float(w))
                     for w, a, b in pairs[:max_edges]]  # fmt: skip
        return cls(provenance=provenance or Provenance.of(None, {"k": k, "threshold": threshold}),
                   nodes=tuple(nodes), edges=tuple(edges), method=method, n_layers=n_layers,
                   n_heads=n_heads)  # fmt: skip

    @property
    def heads(self) -> list[tuple[int, int]]:
        """The circuit's heads as ``(layer, head)``, in node order."""
        out = []
        for name, _, _ in self.nodes:
            kind, layer, head = parse_node(name)
            if kind == "head" and head is not None:
                out.append((layer, head))
        return out

    @property
    def mlps(self) -> list[int]:
        """The circuit's MLP layers."""
        return [parse_node(n)[1] for n, _, _ in self.nodes if n.startswith("MLP")]

    def mask(self) -> np.ndarray:
        """``[layer, head]`` booleans: which heads are in the circuit."""
        out = np.zeros((self.n_layers, self.n_heads), dtype=bool)
        for layer, head in self.heads:
            out[layer, head] = True
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per node: ``node, kind, layer, head, score, degree`` (edges touching it)."""
        degree = {n[0]: 0 for n in self.nodes}
        for src, dst, _ in self.edges:
            degree[src] += 1
            degree[dst] += 1
        rows = []
        for name, layer, score in self.nodes:
            kind, _, head = parse_node(name)
            rows.append({"node": name, "kind": kind, "layer": layer,
                         "head": -1 if head is None else head, "score": score,
                         "degree": degree[name]})  # fmt: skip
        return pd.DataFrame(rows, columns=["node", "kind", "layer", "head", "score", "degree"])

    def figure(self) -> go.Figure:
        """The circuit drawn in layers (x = layer; edge width by weight; nodes coloured by score)."""
        title = f"circuit ({self.method})" if self.method else "circuit"
        return circuit_graph(list(self.nodes), list(self.edges), title=title,
                             colorscale="Viridis")  # fmt: skip

    def payload(self) -> dict[str, Any]:
        """JSON body: ``heads`` ([[layer, head], ...]), ``mlps``, ``nodes``, ``edges``."""
        return {"heads": [list(h) for h in self.heads], "mlps": self.mlps,
                "nodes": [list(n) for n in self.nodes], "edges": [list(e) for e in self.edges],
                "method": self.method}  # fmt: skip


__all__ = ["Circuit", "parse_node"]
