"""The dashboard: a Dash app over a run store (``mechscope app --store DIR``).

A shell (a navigation bar, ``dash.page_container`` and one ``dcc.Store`` holding the chosen run's
id) plus one page per module of :mod:`mechscope.app.pages`, registered with
``dash.register_page``: Runs (list, filter, open, compare), Causal tracing, Heads (click a head
for its attention pattern), Circuits (graph and cross-method agreement) and Explore (run the
tracer or an analysis as a background job). Pages draw with the shared figure functions
(:mod:`mechscope.figures`, ``Result.figure()``, :mod:`mechscope.views`), so the dashboard, the
HTML report and the notebooks show the same figures.

The store is opened read-only (:class:`~mechscope.store.Store` with ``readonly=True``) for
every request; only the Explore page's jobs write, each through ``Store(root).run(...)`` in its
own process. Only run ids and small selections travel to the browser; tensors stay on the
server. The app serves Dash's own component bundles (checked against the registered packages)
and nothing from the file system: no route reads a path taken from a URL.
"""

from __future__ import annotations

import atexit
import errno
import logging
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import dash
from dash import dcc, html

from mechscope.app import ui
from mechscope.app.data import AppContext
from mechscope.app.data import store_root as checked_root
from mechscope.app.pages import PAGES
from mechscope.app.pages import explore as explore_page
from mechscope.errors import InputError

log = logging.getLogger(__name__)

NAVBAR = "navbar"
_NAV_STYLE = {"display": "flex", "gap": "18px", "alignItems": "baseline", "padding": "10px 16px",
              "background": "#f4f4f4", "borderBottom": "1px solid #ddd"}  # fmt: skip


def _background_manager(cache_dir: Path) -> dash.DiskcacheManager:
    import diskcache

    return dash.DiskcacheManager(diskcache.Cache(str(cache_dir)))


def create_app(store_root: Path | str, *, explore: bool = True) -> dash.Dash:
    """The dashboard over the store at ``store_root`` (read-only; see the module docstring).

    ``explore=False`` leaves out the Explore page's jobs: the app then never writes anything.
    With ``explore``, background jobs keep their state in a fresh temporary folder outside the
    store (removed when the process exits).

    Raises:
        StoreError: the folder does not exist or is not a store.
    """
    root = checked_root(store_root)
    cache_dir = Path(tempfile.mkdtemp(prefix="mechscope-app-")) if explore else None
    if cache_dir is not None:
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    ctx = AppContext(root, explore=explore, cache_dir=cache_dir)
    app = dash.Dash(
        __name__, use_pages=True, pages_folder="", title="mechscope",
        assets_folder=str(Path(__file__).with_name("assets")),
        suppress_callback_exceptions=True, serve_locally=True,
        background_callback_manager=_background_manager(cache_dir) if cache_dir else None,
    )  # fmt: skip
    for order, page in enumerate(PAGES):
        layout = explore_page.disabled_layout if page is explore_page and not explore else page.layout
        dash.register_page(page.__name__, path=page.PATH, name=page.NAME, order=order,
                           layout=layout)  # fmt: skip
        page.register(app, ctx)
    _refuse_traversal(app)
    links = [dcc.Link(page.NAME, href=page.PATH, id=f"nav-{page.__name__.rsplit('.', 1)[-1]}")
             for page in PAGES]  # fmt: skip
    app.layout = html.Div([
        html.Nav([html.B("mechscope"), *links, html.Span(f"store {root}",
                                                          style={"color": "#777", "fontSize": "12px"})],
                 id=NAVBAR, style=_NAV_STYLE),
        dcc.Store(id=ui.SELECTED_RUN, storage_type="session"),
        html.Div(dash.page_container, style={"padding": "0 16px"}),
    ], style={"fontFamily": "sans-serif"})  # fmt: skip
    return app


def _refuse_traversal(app: dash.Dash) -> None:
    """404 for any URL with a ``..`` segment or a NUL (before any route sees it), and for
    Dash's refusal of an unregistered component-suite path (a 500 otherwise)."""
    from flask import abort, request

    @app.server.before_request
    def _no_dotdot() -> None:
        parts = request.path.replace("\\", "/").split("/")
        if ".." in parts or "\x00" in request.path:
            abort(404)

    app.server.register_error_handler(
        dash.exceptions.DependencyException, lambda _: ("not found", 404))


def check_port(host: str, port: int) -> None:
    """Raise :class:`InputError` when ``host:port`` cannot be bound (in use, or not allowed)."""
    if not 0 < port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use; pick another with "
                             f"--port {port + 1 if port < 65535 else 8050}") from None  # fmt: skip
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(store_root: Path | str, host: str = "127.0.0.1", port: int = 8050, *,
          explore: bool = True, ready: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Serve the dashboard until Ctrl-C or SIGTERM (which return normally).

    ``ready(url)`` is called once the port is bound (the CLI prints the URL there).

    Raises:
        StoreError: no store at ``store_root``.
        InputError: the port is in use or cannot be bound.
    """
    from werkzeug.serving import make_server

    check_port(host, port)
    app = create_app(store_root, explore=explore)
    try:
        server = make_server(host, port, app.server, threaded=True)
    except OSError as exc:  # lost a race for the port
        raise InputError(f"cannot listen on {host}:{port}: {exc}; pick another with --port") from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log; errors still show
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if ready is not None:
        ready(url)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None  # `kill`: as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("dashboard stopped")
    finally:
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


__all__ = ["check_port", "create_app", "serve"]
