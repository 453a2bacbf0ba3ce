"""Fixtures of the browser tests: a store filled by the real demo on zoo models, the dashboard
(``mechscope app``) serving it on a free loopback port in a subprocess, and a headless Chromium
page driven by Playwright (Debian's ``/usr/bin/chromium``; no browser download).

Without Chromium or Playwright the tests are skipped, with the reason, unless
``MECHSCOPE_REQUIRE_BROWSER=1`` (CI), where they fail. Screenshots go to
``$MECHSCOPE_ARTIFACTS/browser`` (else a pytest temporary folder), never into the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MECHSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]  # fmt: skip


def _unavailable(reason: str) -> None:
    if os.environ.get("MECHSCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required (MECHSCOPE_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and the server log go (outside git)."""
    base = os.environ.get("MECHSCOPE_ARTIFACTS")
    out = Path(base) / "browser" if base else tmp_path_factory.mktemp("browser-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


# The CLI, with Ctrl-C restored (a shell without job control starts background jobs with SIGINT
# ignored, and a child inherits that).
MECHSCOPE = [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, "
             "signal.default_int_handler); from mechscope.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the dashboard did not start:\n{log.read_text()}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def dashboard(tmp_path_factory: pytest.TempPathFactory, artifacts: Path
              ) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The store and the server, started side by side (the server reads the store per request,
    so it may start before the runs land): the real demo on zoo:ioi (heads, patching, SAE
    circuit, evaluation) and on zoo:facts without head analyses (it has a causal trace), as
    ``mechscope demo``; that trace saved again as a standalone run (``Result.save``); and
    ``mechscope app`` on a free loopback port. Yields the run ids, the URL, the server's process
    and its log file."""
    from mechscope.results import Result
    from mechscope.store import Store

    root = tmp_path_factory.mktemp("browser-store")
    Store(root)  # create it once, before the writers and the reader start
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    log = artifacts / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([*MECHSCOPE, "app", "--store", str(root), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    demos = {name: subprocess.Popen([*MECHSCOPE, "demo", "--model", f"zoo:{name}", "--store",
                                     str(root), "--json", *flags],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for name, flags in (("ioi", []), ("facts", ["--no-heads", "--no-circuits"]))}  # fmt: skip
    ids = {}
    for name, proc in demos.items():
        out_, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        ids[name] = json.loads(out_)["run_id"]
    store = Store(root)
    ids["trace"] = Result.load(store, ids["facts"], "causal_trace").save(store)
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(server, url, log)
    yield {"root": root, **ids, "url": url, "log": log, "proc": server, "port": port}
    if server.poll() is None:
        server.send_signal(2)  # Ctrl-C
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def browser_store(dashboard: dict[str, Any]) -> dict[str, Any]:
    """The filled store's root and run ids (``ioi``, ``facts``, ``trace``)."""
    return dashboard


@pytest.fixture(scope="session")
def server(dashboard: dict[str, Any]) -> dict[str, Any]:
    """The running dashboard: ``url``, ``port``, ``proc``, ``log``."""
    return dashboard


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is None:
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set "
                     "MECHSCOPE_CHROMIUM)")  # fmt: skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class PageWatch:
    """A page and what went wrong on it: console errors, page errors, failed responses."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("response", lambda r: r.status >= 400 and self.errors.append(
            f"HTTP {r.status} {r.url}"))  # fmt: skip


@pytest.fixture(scope="module")
def watch(browser: Any, server: dict[str, Any]) -> Iterator[PageWatch]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield PageWatch(page)
    context.close()
