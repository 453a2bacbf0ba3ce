"""The dashboard in a real browser: every page renders figures with data from a store filled by
the demo, clicking a head shows its attention pattern, an Explore job runs end to end and its run
appears, no callback fails (page, console or server log), no URL leaks a file, and Ctrl-C stops
the server cleanly. Tests run in file order and share one page (the last one stops the server).
"""

from __future__ import annotations

import http.client
import signal
from pathlib import Path
from typing import Any

import pytest

# Shapes of each graph's traces as plotly drew them (``_fullData``: typed arrays decoded).
GRAPH_DATA = """els => els.map(e => (e._fullData || []).map(t => ({
    type: t.type, rows: t.z && t.z.length ? t.z.length : 0,
    points: t.x && t.x.length ? t.x.length : 0})))"""


def _goto(watch: Any, server: dict[str, Any], path: str) -> Any:
    page = watch.page
    page.goto(server["url"] + path)
    page.wait_for_load_state("networkidle")
    return page


def _graphs(page: Any, scope: str, n: int = 1, timeout: float = 30_000) -> list[list[dict[str, Any]]]:
    """Wait for ``n`` rendered plotly graphs under ``scope`` and return their traces' shapes."""
    page.wait_for_function(
        "([scope, n]) => Array.from(document.querySelectorAll(scope + ' .js-plotly-plot'))"
        ".filter(e => e.data && e.data.length).length >= n", arg=[scope, n], timeout=timeout)
    return list(page.eval_on_selector_all(scope + " .js-plotly-plot", GRAPH_DATA))


def _heatmaps_with_data(graphs: list[list[dict[str, Any]]]) -> int:
    return sum(any(t["type"] == "heatmap" and t["rows"] > 0 for t in g) for g in graphs)


def _clean(watch: Any, server: dict[str, Any]) -> None:
    """No error in the page, the console, the responses or the server log."""
    assert watch.page.locator(".dash-fe-error, .dash-error-card").count() == 0
    assert not watch.errors, watch.errors
    log = Path(server["log"]).read_text()
    assert "Traceback" not in log and "Exception on" not in log, log


def _shot(watch: Any, artifacts: Path, name: str) -> None:
    watch.page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def test_runs_page_lists_opens_and_compares(watch: Any, server: dict[str, Any],
                                            browser_store: dict[str, Any], artifacts: Path) -> None:
    page = _goto(watch, server, "/")
    table = page.locator("#runs-table")
    for run_id in (browser_store["ioi"], browser_store["facts"], browser_store["trace"]):
        table.get_by_text(run_id, exact=True).wait_for()
    kind_filter = page.locator('#runs-table th.dash-filter[data-dash-column="kind"] input[type=text]')
    kind_filter.fill("causal_trace")
    kind_filter.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#runs-table tbody tr td "
                           "input[type=radio]').length === 1")
    assert table.get_by_text(browser_store["trace"], exact=True).count() == 1
    kind_filter.fill("")
    kind_filter.press("Enter")
    row = page.locator("#runs-table tr", has_text=browser_store["ioi"])
    row.locator("input[type=radio]").check()
    page.locator("#runs-detail .ms-section").first.wait_for()
    assert page.locator("#runs-detail").get_by_text(f"run {browser_store['ioi']}").count() == 1
    graphs = _graphs(page, "#runs-detail", n=5)
    assert _heatmaps_with_data(graphs) >= 3
    compare = _graphs(page, "#runs-compare", n=4)
    assert _heatmaps_with_data(compare) >= 2
    _shot(watch, artifacts, "runs")
    _clean(watch, server)


def test_causal_tracing_page(watch: Any, server: dict[str, Any], artifacts: Path) -> None:
    page = _goto(watch, server, "/tracing")
    graphs = _graphs(page, "#tracing-figures")
    assert _heatmaps_with_data(graphs) >= 1
    averaged = _graphs(page, "#tracing-average")
    assert _heatmaps_with_data(averaged) >= 1
    labels = page.eval_on_selector("#tracing-figures .js-plotly-plot", "e => e.data[0].x")
    assert any("*" in str(x) for x in labels)  # subject tokens marked
    _shot(watch, artifacts, "tracing")
    _clean(watch, server)


def _click_first_grid(page: Any) -> None:
    grid = page.locator("#heads-grids .js-plotly-plot").first
    box = grid.locator(".nsewdrag").first.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)


def test_heads_page_click_shows_pattern(watch: Any, server: dict[str, Any],
                                        browser_store: dict[str, Any], artifacts: Path) -> None:
    page = _goto(watch, server, "/heads")  # the run chosen on the Runs page (zoo:ioi demo)
    grids = _graphs(page, "#heads-grids", n=3)
    assert _heatmaps_with_data(grids) >= 3
    assert page.locator("#heads-pattern").get_by_text("click a head").count() == 1
    _click_first_grid(page)
    pattern = _graphs(page, "#heads-pattern")
    assert _heatmaps_with_data(pattern) == 1
    title = page.eval_on_selector("#heads-pattern .js-plotly-plot", "e => e.layout.title.text")
    assert title.startswith("L") and "H" in title
    _shot(watch, artifacts, "heads")
    _clean(watch, server)


def test_circuits_page(watch: Any, server: dict[str, Any], artifacts: Path) -> None:
    page = _goto(watch, server, "/circuits")
    graphs = _graphs(page, "#circuits-graph", n=2)
    assert any(any(t["type"] == "scatter" and t["points"] > 0 for t in g) for g in graphs)
    agreement = _graphs(page, "#circuits-agreement")
    assert _heatmaps_with_data(agreement) >= 1
    assert sum(t["type"] == "heatmap" for t in agreement[0]) >= 3  # SAE, patching, retrieval, ...
    _shot(watch, artifacts, "circuits")
    _clean(watch, server)


def test_explore_job_end_to_end(watch: Any, server: dict[str, Any], artifacts: Path) -> None:
    page = _goto(watch, server, "/explore")
    page.fill("#explore-spec", "zoo:nope")
    page.click("#explore-run")
    error = page.locator("#explore-output .ms-error")
    error.wait_for(timeout=60_000)
    assert "nope" in error.inner_text()

    page.fill("#explore-spec", "zoo:induction")
    page.fill("#explore-prompt", "5 6 7 8 9 5 6 7 8")
    page.click("#explore-run")
    done = page.locator("#explore-output .ms-new-run")
    done.wait_for(timeout=90_000)
    run_id = done.inner_text().split()[2]
    assert _heatmaps_with_data(_graphs(page, "#explore-output")) == 1
    assert page.eval_on_selector("#explore-progress", "e => e.value") == 4
    _shot(watch, artifacts, "explore")

    page.get_by_text("see its heads").click()  # the new run is now the selected one
    page.locator("#heads-run").get_by_text(run_id).wait_for()
    _graphs(page, "#heads-grids")
    _click_first_grid(page)
    pattern = _graphs(page, "#heads-pattern")
    assert _heatmaps_with_data(pattern) == 1
    ticks = page.eval_on_selector("#heads-pattern .js-plotly-plot", "e => e.data[0].x")
    assert list(ticks)[:2] == ["0: 5", "1: 6"]
    _shot(watch, artifacts, "explore-heads")
    page = _goto(watch, server, "/")  # and the runs list has it
    page.locator("#runs-table").get_by_text(run_id, exact=True).wait_for()
    _clean(watch, server)


TRAVERSALS = (
    "/../../../../etc/passwd",
    "/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/assets/../../../../etc/passwd",
    "/assets/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/_dash-component-suites/../../../../etc/passwd",
    "/_dash-component-suites/dash/../../../../../../etc/passwd",
    "/_dash-component-suites/dash/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/_dash-component-suites/dash/deps/..%2f..%2f..%2f__init__.py",
    "/store.db",
    "/tensors/",
)


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_file_outside_assets_is_served(server: dict[str, Any], path: str) -> None:
    """A raw request (no client-side normalisation of ``..``) never returns a file's bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert b"root:" not in body and b"SQLite format" not in body and b"import " not in body
    assert resp.status in (200, 400, 404), resp.status  # 200: the app's own HTML shell
    if resp.status == 200:
        assert body.lstrip().lower().startswith(b"<!doctype html>")


def test_server_log_clean_and_ctrl_c_stops(server: dict[str, Any]) -> None:
    log = Path(server["log"]).read_text()
    assert f"http://127.0.0.1:{server['port']}/" in log
    assert "Traceback" not in log and "Exception on" not in log, log
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    assert "stopped" in Path(server["log"]).read_text()
