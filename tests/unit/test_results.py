"""The Result contract: save -> load round trips, provenance, refusals, the reusable results."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from jaxtyping import TypeCheckError

from mechscope.errors import InputError, StoreError
from mechscope.figures import CircuitNode
from mechscope.models.loading import fingerprint
from mechscope.results import (
    FORMAT_VERSION,
    HeadScores,
    LayerPositionScores,
    Provenance,
    Result,
    class_name,
)
from mechscope.store import Store
from tests.conftest import TINY


@dataclass(frozen=True)
class ProbeConfig:
    layers: tuple[int, ...] = (0, 1)
    metric: str = "logit_diff"


@dataclass(frozen=True, kw_only=True, eq=False)
class ProbeResult(Result):
    """A head-score result with every kind of field the generic codec handles."""

    scores: torch.Tensor  # [layer, head]
    counts: torch.Tensor
    mask: np.ndarray
    shape: tuple[int, int]
    by_head: dict[tuple[int, int], str]
    series: list[Any]
    summary: dict[str, Any]
    node: CircuitNode
    where: Path
    missing: float
    note: str = "probe"

    def to_frame(self) -> pd.DataFrame:
        n_layers, n_heads = self.scores.shape
        return pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_heads),
                             "head": np.tile(np.arange(n_heads), n_layers),
                             "score": self.scores.reshape(-1).tolist()})

    def figure(self) -> go.Figure:
        return go.Figure()


@dataclass(frozen=True, kw_only=True, eq=False)
class OtherResult(Result):
    value: int

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"value": [self.value]})

    def figure(self) -> go.Figure:
        return go.Figure()


def make_probe(provenance: Provenance) -> ProbeResult:
    return ProbeResult(
        provenance=provenance,
        scores=torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),
        counts=torch.tensor([[1, 2], [3, 4]], dtype=torch.int16),
        mask=np.array([True, False, True]),
        shape=(2, 4),
        by_head={(0, 1): "induction", (1, 3): "previous token"},
        series=[(1, "a"), [2.5, None], {"x": torch.ones(3, dtype=torch.float16)}],
        summary={"mean": 0.25, "nan": float("nan"), "inf": -math.inf, "__odd": 1, "np": np.zeros(2)},
        node=CircuitNode(name="L1H3", layer=1, score=0.5),
        where=Path("/tmp/x"),
        missing=float("nan"),
    )


@pytest.fixture
def provenance(tiny) -> Provenance:
    return Provenance.of(tiny, ProbeConfig(), seed=3)


def open_for_reading(root: Path) -> Store:
    """The store read-only where the store supports it (readers never write)."""
    if "readonly" in inspect.signature(Store).parameters:
        return Store(root, readonly=True)  # type: ignore[call-arg]
    return Store(root)


def test_save_load_round_trips_exactly(tmp_path, provenance):
    result = make_probe(provenance)
    run_id = result.save(Store(tmp_path))
    loaded = ProbeResult.load(open_for_reading(tmp_path), run_id)
    assert loaded == result and loaded.equals(result)
    assert loaded is not result
    # types survive, not only values
    assert isinstance(loaded.shape, tuple) and isinstance(loaded.series[0], tuple)
    assert isinstance(loaded.series[1], list)
    assert loaded.counts.dtype == torch.int16 and loaded.series[2]["x"].dtype == torch.float16
    assert isinstance(loaded.mask, np.ndarray) and loaded.mask.dtype == np.bool_
    assert isinstance(loaded.summary["np"], np.ndarray)
    assert set(loaded.by_head) == {(0, 1), (1, 3)}
    assert isinstance(loaded.node, CircuitNode) and isinstance(loaded.where, Path)
    assert math.isnan(loaded.missing) and loaded.summary["inf"] == -math.inf
    assert list(loaded.summary) == ["mean", "nan", "inf", "__odd", "np"]


def test_equality_sees_every_field(provenance):
    a = make_probe(provenance)
    bumped = a.scores.clone()
    bumped[1, 2] += 1e-3
    assert a != ProbeResult(**{**a.__dict__, "scores": bumped})
    assert a != ProbeResult(**{**a.__dict__, "shape": [2, 4]})  # a list is not a tuple
    assert a != ProbeResult(**{**a.__dict__, "counts": a.counts.to(torch.int32)})  # dtype counts
    assert a != ProbeResult(**{**a.__dict__, "provenance": Provenance.of(None, seed=3)})


def test_provenance_travels(tmp_path, tiny, provenance):
    store = Store(tmp_path)
    run_id = make_probe(provenance).save(store)
    rec = store.get_run(run_id)
    assert rec.kind == "probe_result" and rec.status == "complete"
    assert rec.model_spec == TINY and rec.model_fingerprint == fingerprint(tiny)
    assert rec.seed == 3 and rec.config == {"layers": [0, 1], "metric": "logit_diff"}
    loaded = ProbeResult.load(store, run_id).provenance
    assert loaded == provenance
    assert loaded.model_spec == TINY and loaded.model_fingerprint == fingerprint(tiny)
    assert loaded.seed == 3 and loaded.config == {"layers": [0, 1], "metric": "logit_diff"}
    assert loaded.versions["torch"] == torch.__version__ and "mechscope" in loaded.versions
    assert store.json(run_id, "result") == {"class": class_name(ProbeResult),
                                            "format": FORMAT_VERSION, "fields": [
        "scores", "counts", "mask", "shape", "by_head", "series", "summary", "node", "where",
        "missing", "note"]}  # fmt: skip
    # the frame and the scalar fields are readable without the class
    assert store.table(run_id, "frame").columns.tolist() == ["layer", "head", "score"]
    assert store.json(run_id, "note") == "probe"
    assert torch.equal(store.tensors(run_id, "tensors")["scores"], make_probe(provenance).scores)


def test_load_refuses_another_class(tmp_path, provenance):
    store = Store(tmp_path)
    run_id = make_probe(provenance).save(store)
    with pytest.raises(StoreError, match="ProbeResult, not a .*OtherResult"):
        OtherResult.load(store, run_id)
    with pytest.raises(StoreError, match="not saved by Result.save"):
        with store.run("plain") as run:
            run.add_json("x", 1)
        ProbeResult.load(store, run.id)


def test_load_refuses_a_failed_run(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.run("other_result") as run:
        run.add_json("result", {"class": class_name(OtherResult), "format": FORMAT_VERSION,
                                "fields": ["value"]})  # fmt: skip
        raise RuntimeError("crashed mid-analysis")
    with pytest.raises(StoreError, match="failed.*crashed mid-analysis"):
        OtherResult.load(store, run.id)


def test_load_refuses_another_format(tmp_path):
    store = Store(tmp_path)
    with store.run("other_result") as run:
        run.add_json("result", {"class": class_name(OtherResult), "format": 99, "fields": []})
        run.add_json("provenance", {})
    with pytest.raises(StoreError, match="format 99"):
        OtherResult.load(store, run.id)


def test_unstorable_field_is_refused_before_a_run_starts(tmp_path):
    store = Store(tmp_path)
    bad = OtherResult(provenance=Provenance.of(None), value={1, 2})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="value holds a set"):
        bad.save(store)
    assert store.runs() == []


def test_subclass_declared_with_dataclass_eq_is_refused():
    @dataclass(frozen=True, kw_only=True)
    class Careless(Result):
        x: torch.Tensor = field(default_factory=lambda: torch.zeros(2))

        def to_frame(self) -> pd.DataFrame:
            return pd.DataFrame()

        def figure(self) -> go.Figure:
            return go.Figure()

    with pytest.raises(TypeError, match="eq=False"):
        Careless(provenance=Provenance.of(None))
    assert Careless.kind == "careless" and OtherResult.kind == "other_result"


def test_provenance_config_is_plain_json():
    prov = Provenance.of(None, {"layers": (1, 2), "path": Path("/a")}, seed=None)
    assert prov.config == {"layers": [1, 2], "path": "/a"}
    assert prov.model_spec is None and prov.model_fingerprint is None
    with pytest.raises(InputError, match="finite"):
        Provenance.of(None, {"lr": float("nan")})
    with pytest.raises(InputError, match="JSON-able; got a set"):
        Provenance.of(None, {"heads": {1, 2}})


def test_head_scores(tmp_path):
    scores = torch.tensor([[0.5, float("nan"), -2.0], [1.5, 0.25, 0.5]])
    hs = HeadScores(provenance=Provenance.of(None), scores=scores, metric="patching effect",
                    labels={(1, 0): "mover"})  # fmt: skip
    frame = hs.to_frame()
    assert frame.columns.tolist() == ["layer", "head", "score", "label"]
    for row in frame.itertuples():
        expected = float(scores[row.layer, row.head])
        assert row.score == expected or (math.isnan(row.score) and math.isnan(expected))
    assert frame.loc[(frame["layer"] == 1) & (frame["head"] == 0), "label"].item() == "mover"
    assert hs.top(3) == [(1, 0, 1.5), (0, 0, 0.5), (1, 2, 0.5)]  # NaN skipped, ties layer-major
    assert hs.top(2, by_abs=True) == [(0, 2, -2.0), (1, 0, 1.5)]
    assert hs.top(100)[-1] == (0, 2, -2.0) and len(hs.top(100)) == 5 and hs.top(0) == []
    fig = hs.figure()
    np.testing.assert_array_equal(np.asarray(fig.data[0].z, dtype=float), scores.numpy())
    assert fig.layout.title.text == "patching effect" and fig.data[0].zmid == 0.0
    store = Store(tmp_path)
    assert HeadScores.load(store, hs.save(store)) == hs
    assert isinstance(Result.load(store, store.latest("head_scores").id), HeadScores)
    with pytest.raises((InputError, TypeCheckError)):
        HeadScores(provenance=Provenance.of(None), scores=torch.zeros(4), metric="x")
    with pytest.raises(InputError, match="outside"):
        HeadScores(provenance=Provenance.of(None), scores=torch.zeros(2, 2), metric="x",
                   labels={(2, 0): "nope"})  # fmt: skip


def test_layer_position_scores(tmp_path):
    scores = torch.arange(6.0).reshape(2, 3)
    lp = LayerPositionScores(provenance=Provenance.of(None), scores=scores,
                             tokens=["Paris", "is", "Paris"], metric="restored p")  # fmt: skip
    assert lp.tokens == ("Paris", "is", "Paris")
    frame = lp.to_frame()
    assert frame.columns.tolist() == ["layer", "pos", "token", "score"]
    assert frame.iloc[5].tolist() == [1, 2, "Paris", 5.0]
    fig = lp.figure()
    assert list(fig.data[0].x) == ["0: Paris", "1: is", "2: Paris"]
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), scores.numpy())
    store = Store(tmp_path)
    loaded = LayerPositionScores.load(store, lp.save(store))
    assert loaded == lp and isinstance(loaded.tokens, tuple)
    with pytest.raises(InputError, match="2 entries but scores has 3"):
        LayerPositionScores(provenance=Provenance.of(None), scores=scores, tokens=["a", "b"],
                            metric="x")  # fmt: skip


def test_staged_results_round_trip_inside_one_run(tmp_path) -> None:
    """Several results staged in one run come back equal, by name; stored_results lists them."""
    from mechscope.results import stored_results

    store = Store(tmp_path)
    a = HeadScores(provenance=Provenance.of(None, {"a": 1}, seed=0), scores=torch.rand(2, 3),
                   metric="a")
    b = HeadScores(provenance=Provenance.of(None, {"b": 2}, seed=1), scores=torch.rand(2, 3),
                   metric="b")
    with store.run("bundle", seed=0) as run:
        a.stage(run, "first")
        b.stage(run, "second-one")
        run.add_json("other", {"x": 1})
    ro = Store(tmp_path, readonly=True)
    assert stored_results(ro, run.id) == {"first": class_name(HeadScores),
                                          "second-one": class_name(HeadScores)}
    assert Result.load(ro, run.id, "first") == a
    assert HeadScores.load(ro, run.id, "second-one") == b
    with pytest.raises(StoreError, match="holds no result named 'third'"):
        Result.load(ro, run.id, "third")
    saved = a.save(store)
    assert stored_results(store, saved) == {"": class_name(HeadScores)}


def test_stage_refuses_bad_names(tmp_path) -> None:
    store = Store(tmp_path)
    r = HeadScores(provenance=Provenance.of(None, {}, seed=0), scores=torch.rand(1, 1), metric="r")
    with pytest.raises(InputError, match="letters, digits"), store.run("bundle") as run:
        r.stage(run, "a.b")
    assert store.runs()[0].status == "failed"
