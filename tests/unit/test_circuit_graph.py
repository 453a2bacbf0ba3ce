"""The Circuit graph (mechscope.circuits.graph): built from any head scores, drawn in layers,
saved and loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.circuits.graph import Circuit, parse_node
from mechscope.errors import InputError
from mechscope.results import HeadScores, Provenance
from mechscope.store import Store

SCORES = torch.tensor([[0.9, -0.8, 0.0], [0.1, 0.5, 0.0]])


def test_selection_by_k_threshold_and_positive_default() -> None:
    assert Circuit.from_scores(SCORES).heads == [(0, 0), (1, 1), (1, 0)]  # every score > 0
    assert Circuit.from_scores(SCORES, k=2).heads == [(0, 0), (1, 1)]
    assert Circuit.from_scores(SCORES, threshold=0.4).heads == [(0, 0), (1, 1)]
    assert Circuit.from_scores(SCORES, k=2, by_abs=True).heads == [(0, 0), (0, 1)]
    assert Circuit.from_scores(SCORES, k=0).heads == []


def test_accepts_any_scorer() -> None:
    hs = HeadScores(provenance=Provenance.of(None), scores=SCORES, metric="m")
    assert Circuit.from_scores(hs, k=1).heads == [(0, 0)]
    assert Circuit.from_scores(SCORES.numpy(), k=1).heads == [(0, 0)]
    assert Circuit.from_scores(SCORES.tolist(), k=1).heads == [(0, 0)]


def test_edges_run_upward_between_kept_heads_only() -> None:
    n = 6  # 2 layers x 3 heads, layer-major
    e = torch.zeros(n, n)
    e[0, 4] = e[4, 0] = 3.0  # L0H0 - L1H1: kept, cross-layer
    e[0, 1] = e[1, 0] = 9.0  # L0H0 - L0H1: same layer -> no edge
    e[2, 5] = e[5, 2] = 7.0  # L0H2 - L1H2: not kept -> no edge
    c = Circuit.from_scores(SCORES, k=3, by_abs=True, edge_scores=e)
    assert c.edges == (("L0H0", "L1H1", 3.0),)
    frame = c.to_frame()
    assert frame.set_index("node").loc["L0H0", "degree"] == 1
    assert list(frame.columns) == ["node", "kind", "layer", "head", "score", "degree"]


def test_mlp_nodes_and_mask() -> None:
    c = Circuit.from_scores(SCORES, k=1, mlp_scores=[0.0, 2.0])
    assert c.mlps == [1] and c.heads == [(0, 0)]
    assert c.mask().tolist() == [[True, False, False], [False, False, False]]
    assert parse_node("MLP1") == ("mlp", 1, None)


def test_figure_payload_and_store_round_trip(tmp_path) -> None:
    e = torch.zeros(6, 6)
    e[0, 4] = 1.0
    c = Circuit.from_scores(SCORES, k=3, edge_scores=e, method="test")
    fig = c.figure()
    assert [t.name for t in fig.data] == ["L0H0 → L1H1", "nodes"]
    assert list(fig.data[-1].text) == ["L0H0", "L1H1", "L1H0"]
    json.dumps(c.payload(), allow_nan=False)
    store = Store(tmp_path / "s")
    assert Circuit.load(store, c.save(store)) == c


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="2 dimension"):
        Circuit.from_scores(torch.zeros(3))
    with pytest.raises(InputError, match="edge scores must be"):
        Circuit.from_scores(SCORES, edge_scores=np.zeros((2, 2)))
    with pytest.raises(InputError, match="MLP scores have 3 layers"):
        Circuit.from_scores(SCORES, mlp_scores=[1, 2, 3])
    with pytest.raises(InputError, match="neither"):
        parse_node("head7")
    with pytest.raises(InputError, match="outside"):
        Circuit(provenance=Provenance.of(None), nodes=(("L5H0", 5, 1.0),), n_layers=2, n_heads=3)
    with pytest.raises(InputError, match="not in the circuit"):
        Circuit(provenance=Provenance.of(None), nodes=(("L0H0", 0, 1.0),),
                edges=(("L0H0", "L1H0", 1.0),), n_layers=2, n_heads=3)  # fmt: skip
