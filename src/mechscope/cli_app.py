"""``mechscope app``: the Dash dashboard over a run store (:mod:`mechscope.app`).

Bound to 127.0.0.1 unless ``--host`` says otherwise. A store folder that does not exist (or is
not a store) and a port in use are errors with status 2 that say what to do; the URL is printed
once the port is bound; Ctrl-C stops the server and exits with status 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def app_cmd(
    store: Annotated[Path, typer.Option("--store", help="Store directory to browse.")] = Path(
        "mechscope-store"
    ),
    host: Annotated[
        str, typer.Option("--host", help="Interface to listen on (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8050,
    explore: Annotated[
        bool,
        typer.Option(
            "--explore/--no-explore",
            help="Let the Explore page run models and save runs (--no-explore: read only).",
        ),
    ] = True,
) -> None:
    """Open the dashboard over a run store (runs, causal tracing, heads, circuits, explore)."""
    from mechscope.app import check_port, serve
    from mechscope.app.data import store_root

    root = store_root(store)  # StoreError (status 2) when missing or not a store
    check_port(host, port)  # InputError (status 2) naming the port when it is in use

    def ready(url: str) -> None:
        sys.stdout.write(f"mechscope dashboard on {url} (store {root}); Ctrl-C to stop\n")
        sys.stdout.flush()

    serve(root, host=host, port=port, explore=explore, ready=ready)
    sys.stderr.write("stopped\n")
