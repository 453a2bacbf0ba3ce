"""The run views, the HTML report and ``mechscope report``, over a real demo run of ``zoo:ioi``.

One demo run per module (a few seconds); the report must hold every analysis figure of the run
(counted against :func:`mechscope.views.sections`), inline plotly.js exactly once and load
nothing from the network.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from plotly.offline import get_plotlyjs

from mechscope.errors import InputError, StoreError
from mechscope.figures import head_rank_comparison
from mechscope.report import render_report, write_report
from mechscope.results import HeadScores, Provenance, stored_results
from mechscope.store import Store
from mechscope.views import Section, figure_count, head_grids, sections


class _Page(HTMLParser):
    """Collects the report's figure divs and every tag that points somewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[str] = []
        self.plotly_divs = 0
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.scripts_with_src = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "div" and "ms-figure" in classes:
            self.figures.append(a.get("id", ""))
        if tag == "div" and "plotly-graph-div" in classes:
            self.plotly_divs += 1
        if tag == "script" and "src" in a:
            self.scripts_with_src += 1
        for attr in ("src", "href"):
            if attr in a:
                self.links.append((tag, attr, a[attr]))


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from mechscope.demo import DemoConfig, run_demo

    root = tmp_path_factory.mktemp("report-store")
    summary = run_demo(DemoConfig(model="zoo:ioi", report=False), root, progress=False)
    return root, summary["run_id"]


@pytest.fixture(scope="module")
def demo_page(demo_run: tuple[Path, str]) -> str:
    root, run_id = demo_run
    return render_report(Store(root, readonly=True), run_id)


def test_report_holds_every_figure_of_the_demo_run(demo_run, demo_page) -> None:
    root, run_id = demo_run
    store = Store(root, readonly=True)
    parts = sections(store, run_id)
    grids = head_grids(store, run_id)
    expected = figure_count(parts) + (1 if len(grids) >= 2 else 0)
    page = _parse(demo_page)
    assert len(page.figures) == expected
    assert len(set(page.figures)) == len(page.figures)  # unique ids
    assert page.plotly_divs == expected
    assert demo_page.count("Plotly.newPlot(") == expected
    staged = stored_results(store, run_id)
    assert len(staged) >= 4, staged  # patching, sinks, retrieval, SAE circuit, evaluation
    assert len(page.figures) >= len(staged)
    # every staged result has a section with at least one figure, or says why it has none
    by_name = {s.name: s for s in parts}
    for name in staged:
        assert by_name[name].figures or by_name[name].skipped, name
    # the demo's plain parts: predictions, prompt 0's patterns (one per layer), head norms
    assert by_name["predictions"].table is not None
    assert len(by_name["attention_patterns"].figures) == 3  # zoo:ioi has 3 layers
    assert by_name["head_norms"].figures
    # SAE circuit: node scores and circuit graph
    assert [c for c, _ in by_name["sae_circuit"].figures] == ["node scores", "circuit graph"]
    for s in parts:
        assert f">{s.title}</h2>" in demo_page


def test_report_skipped_steps_and_circuit_and_provenance(demo_run, demo_page) -> None:
    root, run_id = demo_run
    store = Store(root, readonly=True)
    rec = store.get_run(run_id)
    skipped = [s for s in sections(store, run_id) if s.skipped]
    assert skipped, "zoo:ioi skips causal tracing and head divergence"
    for s in skipped:
        assert not s.figures
        assert "skipped: " in demo_page
    assert "Discovered circuit" in demo_page and "Cross-method agreement" in demo_page
    assert rec.model_fingerprint and rec.model_fingerprint in demo_page
    assert run_id in demo_page and "Provenance" in demo_page
    assert "version: torch" in demo_page


def test_report_needs_no_network(demo_page) -> None:
    bundle = get_plotlyjs()
    assert demo_page.count(bundle) == 1  # plotly.js inlined exactly once
    page = _parse(demo_page)
    assert page.scripts_with_src == 0
    remote = [x for x in page.links if re.match(r"\s*(https?:)?//", x[2])]
    assert remote == []
    assert "<link" not in demo_page.lower() and "@import" not in demo_page
    # outside the plotly.js bundle (whose strings hold attribution links), no network address
    rest = demo_page.replace(bundle, "")
    assert re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", rest) is None
    assert re.search(r"https?://", rest) is None


def test_write_report_is_atomic_and_refuses_a_folder(demo_run, tmp_path, monkeypatch) -> None:
    root, run_id = demo_run
    store = Store(root, readonly=True)
    out = tmp_path / "deep" / "er" / "r.html"
    assert write_report(store, run_id, out) == out and out.stat().st_size > 1_000_000
    with pytest.raises(InputError, match="is a folder"):
        write_report(store, run_id, tmp_path)

    import mechscope.report as report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    before = out.read_bytes()
    monkeypatch.setattr(report.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_report(store, run_id, out)
    assert out.read_bytes() == before  # the old report is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]  # no temp file left


def test_head_grids_of_the_demo_run(demo_run) -> None:
    root, run_id = demo_run
    grids = head_grids(Store(root, readonly=True), run_id)
    assert {"SAE circuit", "retrieval", "sinks"} <= set(grids)
    assert {g.shape for g in grids.values()} == {(3, 4)}  # zoo:ioi: 3 layers x 4 heads
    assert all(isinstance(g, np.ndarray) and g.dtype == np.float64 for g in grids.values())


def test_head_rank_comparison_is_pure_with_hover_data() -> None:
    a = np.array([[0.1, 0.9, 0.5], [0.3, np.nan, 0.7]])
    b = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    a_before, b_before = a.copy(), b.clone()
    fig = head_rank_comparison({"first": a, "second": b}, k=2)
    assert np.array_equal(a, a_before, equal_nan=True) and torch.equal(b, b_before)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap", "scatter", "scatter"]
    h0 = fig.data[0]
    z = np.asarray(h0.z, dtype=float)
    assert z.shape == (2, 3)
    assert z[0, 1] == 1.0 and np.isnan(z[1, 1]) and z[0, 0] == 0.0  # best 1, worst 0, NaN blank
    custom = np.asarray(h0.customdata, dtype=float)
    assert custom.shape == (2, 3, 2)
    assert custom[0, 1, 0] == 0.9 and custom[0, 1, 1] == 1  # raw score, rank
    assert "rank" in h0.hovertemplate and "first" in h0.hovertemplate
    assert h0.text[1][2] == "L1H2"
    # top-2 marks: first -> L0H1 (0.9), L1H2 (0.7); second -> L1H1 (5), L1H2 (4)
    assert list(zip(fig.data[2].y, fig.data[2].x, strict=True)) == [(0, 1), (1, 2)]
    assert list(zip(fig.data[3].y, fig.data[3].x, strict=True)) == [(1, 1), (1, 2)]
    assert "rank 1" in fig.data[3].hovertext[0]
    assert [ann.text for ann in fig.layout.annotations] == ["first", "second"]
    with pytest.raises(InputError, match="at least one"):
        head_rank_comparison({})
    with pytest.raises(InputError, match="same"):
        head_rank_comparison({"a": np.zeros((2, 3)), "b": np.zeros((3, 2))})
    with pytest.raises(InputError, match="k must be"):
        head_rank_comparison({"a": np.zeros((2, 3))}, k=0)
    with pytest.raises(InputError, match=r"\[layer, head\]"):
        head_rank_comparison({"a": np.zeros(3)})


def _standalone(root: Path, metric: str = "copy score") -> str:
    hs = HeadScores(provenance=Provenance.of(None, {"n": 2}, seed=3), metric=metric,
                    scores=torch.tensor([[0.25, 0.75], [0.5, -1.0]]),
                    labels={(0, 1): "<b>name mover</b>"})  # fmt: skip
    return hs.save(Store(root))


def test_a_standalone_saved_result_renders_escaped(tmp_path) -> None:
    run_id = _standalone(tmp_path, metric="<script>alert(1)</script>")
    store = Store(tmp_path, readonly=True)
    parts = sections(store, run_id)
    assert [(s.name, s.kind, len(s.figures)) for s in parts] == [("", "head_scores", 1)]
    out = write_report(store, None, tmp_path / "r.html")  # None: the newest complete run
    page = out.read_text()
    assert len(_parse(page).figures) == 1
    assert "<script>alert" not in page and "<b>name mover</b>" not in page
    assert "&lt;b&gt;name mover&lt;/b&gt;" in page


def test_a_result_that_does_not_load_is_a_skipped_section(tmp_path) -> None:
    from mechscope.results import FORMAT_VERSION

    store = Store(tmp_path)
    with store.run("pipeline") as run:
        run.add_json("gone.result", {"class": "mechscope.nowhere:Gone", "format": FORMAT_VERSION,
                                     "fields": []})  # fmt: skip
        run.add_json("gone.provenance", {})
        run.add_json("later_summary", {"skipped": "no tokenizer"})
    parts = sections(store, run.id)
    assert [(s.name, s.skipped is not None) for s in parts] == [("gone", True), ("later", True)]
    assert "could not load" in str(parts[0].skipped) and parts[1].skipped == "no tokenizer"
    assert isinstance(parts[0], Section) and head_grids(store, run.id) == {}
    page = render_report(Store(tmp_path, readonly=True), run.id)
    assert "skipped: no tokenizer" in page and len(_parse(page).figures) == 0


def test_cli_report(demo_run, tmp_path, capsys) -> None:
    from mechscope.cli import main

    root, run_id = demo_run
    out = tmp_path / "cli" / "report.html"
    main(["report", "--store", str(root), "--run", run_id[:15], "--out", str(out), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    obj = json.loads(lines[0])
    assert set(obj) == {"report", "run_id", "figures"}
    assert obj["run_id"] == run_id and Path(obj["report"]) == out.resolve() and out.is_file()
    assert obj["figures"] == len(_parse(out.read_text()).figures) > 5
    main(["report", "--store", str(root), "--out", str(out)])  # newest run, human output
    text = capsys.readouterr().out
    assert run_id in text and str(out.resolve()) in text


def test_cli_report_bad_inputs(demo_run, tmp_path, cli) -> None:
    root, _ = demo_run
    missing = tmp_path / "no-such-store"
    code, _, err = cli.run("report", "--store", str(missing), "--out", str(tmp_path / "r.html"))
    assert code == 2 and str(missing) in err and "does not exist" in err
    assert not missing.exists()
    code, _, err = cli.run("report", "--store", str(root), "--run", "nosuchrun",
                           "--out", str(tmp_path / "r.html"))  # fmt: skip
    assert code == 2 and "nosuchrun" in err and "mechscope runs --store" in err
    code, _, err = cli.run("report", "--store", str(root), "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err
    assert not (tmp_path / "r.html").exists()

    failed = tmp_path / "failed-store"
    store = Store(failed)
    with pytest.raises(RuntimeError), store.run("demo") as run:
        raise RuntimeError("boom")
    code, _, err = cli.run("report", "--store", str(failed), "--run", run.id,
                           "--out", str(tmp_path / "f.html"))  # fmt: skip
    assert code == 2 and "failed" in err and not (tmp_path / "f.html").exists()
    code, _, err = cli.run("report", "--store", str(failed), "--out", str(tmp_path / "f.html"))
    assert code == 2 and "no complete run" in err
    with pytest.raises(StoreError, match="failed"):
        sections(Store(failed, readonly=True), run.id)

