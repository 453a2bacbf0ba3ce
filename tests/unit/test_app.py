"""The dashboard without a browser: the pages' helpers on a small store, the app's shape, the
Explore job (a real zoo model), the CLI's bad inputs, and that no URL reads a file."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from mechscope.app import check_port, create_app
from mechscope.app.data import (
    AppContext,
    aggregate_groups,
    all_traces,
    clicked_head,
    default_value,
    head_grids,
    head_pattern,
    parse_prompt,
    pattern_prompts,
    prompt_tokens,
    run_options,
    run_rows,
    store_root,
    trace_runs,
)
from mechscope.app.jobs import run_job
from mechscope.app.pages import circuits, explore, heads, runs, tracing
from mechscope.attribution.causal_trace_result import CausalTraceResult
from mechscope.cli import main
from mechscope.errors import InputError, StoreError
from mechscope.results import HeadScores, Provenance
from mechscope.store import Store


def _trace(seed: int, kind: str = "hidden") -> CausalTraceResult:
    g = torch.Generator().manual_seed(seed)
    return CausalTraceResult(provenance=Provenance.of(None, {"seed": seed}),
                             scores=torch.rand(3, 4, generator=g), tokens=["a", "b", "c", "d"],
                             subject=(1, 3), target=5, p_clean=0.9, p_corrupt=0.1,
                             trace_kind=kind)  # fmt: skip


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two standalone traces, a standalone head-score run, and a trace job's run (zoo:induction)
    with stored patterns and tokens."""
    root = tmp_path_factory.mktemp("app-store")
    store = Store(root)
    traces = [_trace(0).save(store), _trace(1).save(store)]
    scores = HeadScores(provenance=Provenance.of(None), metric="copy score",
                        scores=torch.tensor([[0.1, 0.9], [0.5, 0.2]])).save(store)  # fmt: skip
    steps: list[tuple[int, int, str]] = []
    job = run_job(root, "zoo:induction", "3 4 5 6 3 4 5", "trace",
                  lambda i, n, text: steps.append((i, n, text)))  # fmt: skip
    assert "run_id" in job, job
    assert steps[-1][:2] == (4, 4) and steps[0][2] == "loading zoo:induction"
    return {"root": root, "traces": traces, "scores": scores, "trace_run": job["run_id"]}


def test_pure_helpers() -> None:
    assert clicked_head({"points": [{"x": 3, "y": 0}]}) == (0, 3)
    assert clicked_head({"points": []}) is None and clicked_head({"foo": 1}) is None
    assert parse_prompt("hello", has_tokenizer=True) == "hello"
    assert parse_prompt("1,2, 3", has_tokenizer=False) == [1, 2, 3]
    with pytest.raises(InputError, match="empty"):
        parse_prompt("  ", has_tokenizer=True)
    with pytest.raises(InputError, match="token ids"):
        parse_prompt("one two", has_tokenizer=False)
    opts = [{"label": "x", "value": "a"}, {"label": "y", "value": "b"}]
    assert default_value(opts, "zzz") == "a" and default_value(opts, None) == "a"


def test_store_helpers(small_store: dict[str, Any]) -> None:
    store = Store(small_store["root"], readonly=True)
    rows = run_rows(store)
    assert [r["id"] for r in rows][0] == small_store["trace_run"]  # newest first
    assert {r["kind"] for r in rows} == {"causal_trace", "head_scores", "trace"}
    assert len(run_options(store)) == 4 and len(run_options(store, kinds=("trace",))) == 1
    assert {o["value"] for o in trace_runs(store)} == set(small_store["traces"])
    groups = aggregate_groups(all_traces(store))
    assert list(groups) == ["hidden, 3 layers"] and len(groups["hidden, 3 layers"]) == 2
    grids = head_grids(store, small_store["trace_run"])
    assert list(grids) == ["head norm"] and grids["head norm"].shape == (2, 4)
    assert pattern_prompts(store, small_store["trace_run"]) == [0]
    z, tokens = head_pattern(store, small_store["trace_run"], 0, 1, 2)
    assert z.shape == (7, 7) and tokens == ["3", "4", "5", "6", "3", "4", "5"]
    assert abs(z.sum(1) - 1).max() < 1e-5
    assert prompt_tokens(store, small_store["scores"], 0, 3) == ["0", "1", "2"]  # no tokens
    with pytest.raises(InputError, match="L1H9"):
        head_pattern(store, small_store["trace_run"], 0, 1, 9)
    with pytest.raises(InputError, match="prompt 3"):
        head_pattern(store, small_store["trace_run"], 3, 0, 0)


def _graph_figures(component: Any) -> list[Any]:
    """Every ``dcc.Graph`` figure in a component tree."""
    found = []
    stack = [component]
    while stack:
        c = stack.pop()
        if isinstance(c, list | tuple):
            stack += list(c)
        elif hasattr(c, "figure") and type(c).__name__ == "Graph":
            found.append(c.figure)
        elif hasattr(c, "children"):
            stack.append(c.children)
    return found


def _text(component: Any) -> str:
    return str(component.to_plotly_json() if hasattr(component, "to_plotly_json") else component)


def test_pages_render_from_the_store(small_store: dict[str, Any]) -> None:
    ctx = AppContext(small_store["root"])
    figs = _graph_figures(tracing.trace_figures(ctx, small_store["traces"][0]))
    assert len(figs) == 1 and figs[0].data[0].type == "heatmap"
    assert list(figs[0].data[0].x) == ["0: a", "1: b*", "2: c*", "3: d"]
    averaged = _graph_figures(tracing.averaged(ctx))
    assert len(averaged) == 1 and averaged[0].data[0].z.shape == (3, 6)  # layers x buckets
    assert "no run" in _text(tracing.trace_figures(ctx, None))

    run = small_store["trace_run"]
    grids = heads.grid_graphs(ctx, run)
    assert grids[0].children.id == {"type": heads.GRID, "name": "head norm"}
    assert "click a head" in _text(heads.pattern_view(ctx, run, 0, None))
    assert "no attention patterns" in _text(heads.pattern_view(ctx, small_store["scores"], None, [0, 0]))
    pattern = heads.pattern_view(ctx, run, 0, [1, 0]).figure
    assert pattern.layout.title.text == "L1H0 on prompt 0" and pattern.data[0].z.shape == (7, 7)

    assert _graph_figures(heads.grid_graphs(ctx, small_store["scores"]))
    assert "two or more" in _text(circuits.agreement(ctx, small_store["scores"]))
    assert "no circuit" in _text(circuits.circuit_figures(ctx, small_store["scores"]))
    assert _graph_figures(runs.run_view(ctx, small_store["scores"]))
    assert "not found" in _text(runs.run_view(ctx, "nope"))

    shown = explore.job_view(ctx, {"run_id": run})
    assert "saved run" in _text(shown) and len(_graph_figures(shown)) == 1
    assert "bad spec" in _text(explore.job_view(ctx, {"error": "bad spec"}))


def test_explore_job_errors_are_messages(tmp_path: Path) -> None:
    Store(tmp_path)

    def nothing(i: int, n: int, text: str) -> None:
        pass

    assert "unknown zoo model 'nope'" in run_job(tmp_path, "zoo:nope", "1 2", "trace", nothing)["error"]
    assert "model spec" in run_job(tmp_path, "  ", "1 2", "trace", nothing)["error"]
    assert "unknown analysis" in run_job(tmp_path, "zoo:ioi", "1", "magic", nothing)["error"]
    assert "token ids" in run_job(tmp_path, "zoo:ioi", "hello", "trace", nothing)["error"]
    assert Store(tmp_path, readonly=True).runs() == []


def test_create_app_pages_and_read_only_mode(small_store: dict[str, Any]) -> None:
    import dash

    app = create_app(small_store["root"])
    paths = sorted(p["path"] for p in dash.page_registry.values())
    assert paths == ["/", "/circuits", "/explore", "/heads", "/tracing"]
    outputs = " ".join(app.callback_map)
    for wanted in (runs.TABLE, tracing.FIGURES, heads.PATTERN, circuits.AGREEMENT, explore.RESULT):
        assert wanted in outputs
    quiet = create_app(small_store["root"], explore=False)
    assert explore.RESULT not in " ".join(quiet.callback_map)
    layout = dash.page_registry["mechscope.app.pages.explore"]["layout"]()
    assert "--no-explore" in _text(layout)
    create_app(small_store["root"])  # leave the registry as the default app has it


@pytest.mark.parametrize("path", [
    "/../../../../etc/passwd", "/assets/../../../../etc/passwd", "/assets/..%2f..%2fetc%2fpasswd",
    "/_dash-component-suites/../../../../etc/passwd",
    "/_dash-component-suites/dash/../../../../../../etc/passwd",
    "/_dash-component-suites/nope/x.js", "/store.db", "/assets/store.db",
])  # fmt: skip
def test_no_url_reads_a_file(small_store: dict[str, Any], path: str) -> None:
    client = create_app(small_store["root"], explore=False).server.test_client()
    resp = client.get(path)
    body = resp.get_data()
    assert b"root:" not in body and b"SQLite format" not in body
    assert resp.status_code in (200, 404)
    if resp.status_code == 200:  # the app's HTML shell (Dash pages answer every path)
        assert body.lstrip().lower().startswith(b"<!doctype html>")
    create_app(small_store["root"])


def test_store_root_and_port_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist.*mechscope demo"):
        store_root(tmp_path / "missing")
    with pytest.raises(StoreError, match="not a mechscope store"):
        store_root(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            check_port("127.0.0.1", port)
    with pytest.raises(InputError, match="between 1 and 65535"):
        check_port("127.0.0.1", 70000)


def test_cli_bad_inputs(small_store: dict[str, Any], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(["app", "--store", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            main(["app", "--store", str(small_store["root"]), "--port", str(port)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "--port" in err
