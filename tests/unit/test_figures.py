"""Pure figure functions, checked without a browser: trace types, data, labels, hover text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from jaxtyping import TypeCheckError

from mechscope.errors import InputError
from mechscope.figures import (
    CircuitEdge,
    CircuitNode,
    attention_pattern,
    circuit_graph,
    layer_head_heatmap,
    token_layer_heatmap,
)

BAD_INPUT = (InputError, TypeCheckError)


@pytest.mark.parametrize("kind", ["torch", "numpy", "bf16-grad"])
def test_layer_head_heatmap(kind):
    base = torch.arange(12.0).reshape(3, 4) - 5  # 3 layers x 4 heads: a transpose would show
    scores = {"torch": base, "numpy": base.numpy(),
              "bf16-grad": base.to(torch.bfloat16).requires_grad_()}[kind]
    fig = layer_head_heatmap(scores, title="copy score", zmid=0.0)
    (trace,) = fig.data
    assert trace.type == "heatmap"
    np.testing.assert_array_equal(np.asarray(trace.z), base.numpy())
    assert list(trace.x) == [0, 1, 2, 3] and list(trace.y) == [0, 1, 2]
    assert trace.text[2][1] == "L2H1" and trace.text[0][3] == "L0H3"
    assert "%{text}" in trace.hovertemplate and "%{z" in trace.hovertemplate
    assert trace.zmid == 0.0
    assert fig.layout.title.text == "copy score"
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    json.loads(fig.to_json())  # serialisable: renders offline in reports


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_layer_head_heatmap_refuses_wrong_rank(shape):
    with pytest.raises(InputError, match=r"\[layer, head\].*" + str(shape).replace("(", r"\(")
                       .replace(")", r"\)")):
        layer_head_heatmap(torch.zeros(shape))


def test_token_layer_heatmap_disambiguates_repeated_tokens():
    scores = np.arange(6.0).reshape(2, 3)
    fig = token_layer_heatmap(scores, ["the", "cat", "the"], title="restored p")
    (trace,) = fig.data
    assert trace.type == "heatmap"
    np.testing.assert_array_equal(np.asarray(trace.z), scores)
    assert list(trace.x) == ["0: the", "1: cat", "2: the"]
    assert list(trace.y) == [0, 1]
    assert trace.text[1][2] == "layer 1, 2: the"
    assert fig.layout.xaxis.title.text == "token" and fig.layout.yaxis.title.text == "layer"
    assert fig.layout.title.text == "restored p"


def test_token_layer_heatmap_refuses_wrong_token_count():
    with pytest.raises(InputError, match="2 entries.*3 positions"):
        token_layer_heatmap(torch.zeros(2, 3), ["a", "b"])
    with pytest.raises(InputError, match=r"\[layer, pos\]"):
        token_layer_heatmap(torch.zeros(3), ["a", "b", "c"])


def test_attention_pattern():
    pattern = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.2, 0.2, 0.6]])
    fig = attention_pattern(pattern, ["A", "B", "A"], title="L1H2")
    (trace,) = fig.data
    assert trace.type == "heatmap"
    np.testing.assert_allclose(np.asarray(trace.z), pattern.numpy())
    assert list(trace.x) == ["0: A", "1: B", "2: A"] and list(trace.y) == list(trace.x)
    assert trace.text[1][0] == "query 1: B → key 0: A"
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)
    assert fig.layout.xaxis.title.text == "key" and fig.layout.yaxis.title.text == "query"


def test_attention_pattern_subset_of_queries_and_mismatches():
    fig = attention_pattern(np.full((1, 3), 1 / 3), ["a", "b", "c"], query_tokens=["c"])
    assert list(fig.data[0].y) == ["0: c"] and len(fig.data[0].x) == 3
    with pytest.raises(InputError, match="query"):
        attention_pattern(np.full((1, 3), 1 / 3), ["a", "b", "c"])
    with pytest.raises(InputError, match="key"):
        attention_pattern(torch.eye(3), ["a", "b"])


def test_circuit_graph_layout_and_edges():
    nodes = [("embed", -1, 0.0), ("L0H1", 0, 0.4), ("L0H3", 0, -0.2), ("L1H0", 1, 1.0)]
    edges = [("embed", "L0H1", 0.5), ("L0H1", "L1H0", 2.0), ("L0H3", "L1H0", -1.0)]
    fig = circuit_graph(nodes, edges, title="IOI circuit")
    *edge_traces, node_trace = fig.data
    assert all(t.type == "scatter" for t in fig.data) and len(edge_traces) == 3
    assert list(node_trace.text) == ["embed", "L0H1", "L0H3", "L1H0"]
    assert list(node_trace.x) == [-1.0, 0.0, 0.0, 1.0]  # x = layer
    assert node_trace.y[1] != node_trace.y[2]  # same layer, different heights
    assert list(node_trace.marker.color) == [0.0, 0.4, -0.2, 1.0]
    assert node_trace.hovertext[2] == "L0H3 (layer 0): -0.2"
    pos = {n: (x, y) for n, x, y in zip(node_trace.text, node_trace.x, node_trace.y, strict=True)}
    for trace, (src, dst, w) in zip(edge_traces, edges, strict=True):
        assert (trace.x[0], trace.y[0]) == pos[src] and (trace.x[1], trace.y[1]) == pos[dst]
        assert trace.hovertext == f"{src} → {dst}: {w:.4g}"
    widths = [t.line.width for t in edge_traces]
    assert widths[1] == max(widths) and widths[0] < widths[2] < widths[1]  # by |weight|
    assert edge_traces[2].line.color != edge_traces[1].line.color  # negative weight differs
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.title.text == "IOI circuit"


def test_circuit_graph_accepts_dataclasses_and_validates():
    a, b = CircuitNode(name="a", layer=0, score=1.0), CircuitNode(name="b", layer=2)
    fig = circuit_graph([a, b], [CircuitEdge(src="a", dst="b", weight=0.1)])
    assert list(fig.data[-1].x) == [0.0, 2.0]
    assert len(circuit_graph([], []).data) == 1
    with pytest.raises(InputError, match="unknown node"):
        circuit_graph([a], [("a", "zz", 1.0)])
    with pytest.raises(InputError, match="twice"):
        circuit_graph([a, a], [])
