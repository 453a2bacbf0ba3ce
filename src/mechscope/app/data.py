"""What the dashboard's pages read from the store: pure helpers, testable without a browser.

Every function takes a read-only :class:`~mechscope.store.Store` (or plain values such as a
plotly ``clickData`` dict) and returns plain data or a figure; callbacks in the page modules only
wire these to components. Results are rebuilt with :meth:`mechscope.results.Result.load` and kept
in a small per-process cache keyed by (store root, run id, name): a complete run never changes,
so the cache cannot go stale, and tensors never leave the server.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechscope.errors import InputError, MechscopeError
from mechscope.results import Result, stored_results
from mechscope.store import Store

log = logging.getLogger(__name__)

#: Result kinds the causal-tracing page shows.
TRACE_KINDS = ("causal_trace", "causal_trace_aggregate")
_PATTERNS = re.compile(r"^patterns_prompt(\d+)$")


def run_rows(store: Store) -> list[dict[str, Any]]:
    """One row per run, newest first, for the runs table: id, kind, status, model, created
    (ISO time), results (how many), error."""
    import datetime as dt

    rows = []
    for r in reversed(store.runs()):
        n = len(store.result_names(r.id)) if r.status == "complete" else 0
        created = dt.datetime.fromtimestamp(r.created).isoformat(sep=" ", timespec="seconds")
        rows.append({"id": r.id, "kind": r.kind, "status": r.status, "model": r.model_spec or "",
                     "created": created, "results": n, "error": r.error or ""})  # fmt: skip
    return rows


def run_options(store: Store, *, kinds: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Dropdown options of the complete runs (newest first), optionally of some kinds only."""
    runs = [r for r in reversed(store.runs(status="complete")) if kinds is None or r.kind in kinds]
    return [{"label": f"{r.id}  {r.kind}  {r.model_spec or ''}".rstrip(), "value": r.id}
            for r in runs]  # fmt: skip


def default_value(options: Sequence[Mapping[str, str]], wanted: str | None) -> str | None:
    """``wanted`` when it is one of ``options``, else the first option's value (or None).

    >>> default_value([{"label": "a", "value": "a"}, {"label": "b", "value": "b"}], "b")
    'b'
    >>> default_value([], "b") is None
    True
    """
    values = [o["value"] for o in options]
    if wanted in values:
        return wanted
    return values[0] if values else None


def run_choice(store: Store, selected: str | None) -> tuple[list[dict[str, str]], str | None]:
    """A run dropdown's options and value: every complete run, the shell's chosen run first
    choice (else the newest)."""
    options = run_options(store)
    return options, default_value(options, selected)


@functools.lru_cache(maxsize=64)
def _load_cached(root: str, run_id: str, name: str) -> Result:
    return Result.load(Store(root, readonly=True), run_id, name or None)


def load_result(store: Store, run_id: str, name: str) -> Result:
    """The result ``name`` of a run (``""``: the run itself was saved by ``Result.save``)."""
    rec = store.get_run(run_id)
    return _load_cached(str(store.root.resolve()), rec.id, name)


def results_of(store: Store, run_id: str, *, kinds: Sequence[str] | None = None
               ) -> list[tuple[str, Result]]:  # fmt: skip
    """``(name, result)`` of every result of a run (of ``kinds``); one that no longer loads
    (an old format, a class that moved) is logged and left out rather than failing the page."""
    out = []
    for name in stored_results(store, run_id):
        try:
            result = load_result(store, run_id, name)
        except MechscopeError as exc:
            log.warning("run %s: result %r does not load: %s", run_id, name, exc)
            continue
        if kinds is None or result.kind in kinds:
            out.append((name, result))
    return out


def trace_runs(store: Store) -> list[dict[str, str]]:
    """Dropdown options of the complete runs holding a causal trace (staged or saved)."""
    out = []
    for opt in run_options(store):
        classes = stored_results(store, opt["value"]).values()
        if any(c.endswith((":CausalTraceResult", ":AggregateTrace")) for c in classes):
            out.append(opt)
    return out


def all_traces(store: Store) -> list[tuple[str, str, Result]]:
    """``(run id, name, result)`` of every causal trace in the store (aggregates excluded)."""
    out = []
    for opt in trace_runs(store):
        out += [(opt["value"], n, r) for n, r in results_of(store, opt["value"],
                                                            kinds=("causal_trace",))]
    return out


def trace_label(run_id: str, name: str, result: Any) -> str:
    """A short caption of one trace: run, name, kind, prompt tokens."""
    kind = getattr(result, "trace_kind", "")
    tokens = "".join(getattr(result, "tokens", ()))[:60]
    return f"{run_id} {name or result.kind} ({kind}) {tokens}".strip()


def aggregate_groups(traces: Sequence[tuple[str, str, Any]]) -> dict[str, list[Any]]:
    """Traces grouped by what can be averaged together: ``"kind, N layers"`` -> results."""
    groups: dict[str, list[Any]] = {}
    for _, _, r in traces:
        key = f"{r.trace_kind}{', ' + r.severed + ' severed' if r.severed else ''}, " \
              f"{int(r.scores.shape[0])} layers"
        groups.setdefault(key, []).append(r)
    return groups


# -- heads -------------------------------------------------------------------------------------


def head_grids(store: Store, run_id: str) -> dict[str, np.ndarray]:
    """Every ``[layer, head]`` grid of a run (:func:`mechscope.views.head_grids`) plus the demo's
    per-head output norms (``head norm``) when the run has them."""
    from mechscope import views

    grids = dict(views.head_grids(store, run_id))
    names = store.result_names(run_id)
    if names.get("head_norms") == "tensors" and "head norm" not in grids:
        norms = store.tensors(run_id, "head_norms").get("last_token_mean")
        if norms is not None and norms.ndim == 2:
            grids["head norm"] = norms.double().numpy()
    return grids


def pattern_prompts(store: Store, run_id: str) -> list[int]:
    """Indices ``i`` of the run's stored attention patterns (``patterns_prompt{i}``)."""
    names = store.result_names(run_id)
    found = [int(m.group(1)) for n, k in names.items() if k == "tensors" and (m := _PATTERNS.match(n))]
    return sorted(found)


def prompt_tokens(store: Store, run_id: str, prompt: int, n: int) -> list[str]:
    """Token labels of prompt ``prompt`` (the run's ``tokens`` JSON), or positions when the run
    has none (or a list of another length)."""
    names = store.result_names(run_id)
    if names.get("tokens") == "json":
        tokens = store.json(run_id, "tokens")
        if isinstance(tokens, list) and prompt < len(tokens) and len(tokens[prompt]) >= n:
            return [str(t) for t in tokens[prompt][:n]]
    return [str(i) for i in range(n)]


def head_pattern(store: Store, run_id: str, prompt: int, layer: int, head: int
                 ) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """The stored ``[query, key]`` pattern of one head on one prompt, and its token labels.

    Raises:
        InputError: the run has no pattern of that prompt, layer or head.
    """
    if prompt not in pattern_prompts(store, run_id):
        raise InputError(f"run {run_id} stores no attention patterns of prompt {prompt}")
    layers = store.tensors(run_id, f"patterns_prompt{prompt}")
    pat = layers.get(f"layer{layer}")
    if pat is None or not 0 <= head < pat.shape[0]:
        raise InputError(f"run {run_id} stores no pattern of L{layer}H{head} (prompt {prompt})")
    z = pat[head].double().numpy()
    return z, prompt_tokens(store, run_id, prompt, z.shape[1])


def clicked_head(click: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """``(layer, head)`` of a click on a layer x head heatmap (x = head, y = layer), or None.

    >>> clicked_head({"points": [{"x": 2, "y": 1, "z": 0.5}]})
    (1, 2)
    >>> clicked_head(None) is None
    True
    """
    try:
        point = (click or {})["points"][0]
        return int(point["y"]), int(point["x"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def parse_prompt(text: str | None, *, has_tokenizer: bool) -> str | list[int]:
    """The Explore page's prompt: the text for a model with a tokenizer, else token ids
    separated by spaces or commas.

    >>> parse_prompt("1, 2 3", has_tokenizer=False)
    [1, 2, 3]

    Raises:
        InputError: an empty prompt, or ids that are not integers.
    """
    text = (text or "").strip()
    if not text:
        raise InputError("the prompt is empty; type some text (or token ids for a zoo model)")
    if has_tokenizer:
        return text
    parts = [p for p in re.split(r"[\s,]+", text) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(f"this model has no tokenizer: give token ids separated by spaces, "
                         f"e.g. '1 2 3 4', not {text[:40]!r}") from None


def store_root(path: str | Path) -> Path:
    """The store folder, checked: it exists and holds a store.

    Raises:
        StoreError: no such folder, or not a store.
    """
    from mechscope.errors import StoreError

    root = Path(path).expanduser()
    if not root.exists():
        raise StoreError(f"store {root} does not exist; create one with "
                         f"`mechscope demo --store {root}`")  # fmt: skip
    Store(root, readonly=True)  # StoreError when it is not a store
    return root.resolve()


class AppContext:
    """What every page's callbacks share: the store folder (opened read-only per request) and
    whether the Explore page may run jobs."""

    def __init__(self, root: Path, *, explore: bool = True, cache_dir: Path | None = None) -> None:
        self.root = root
        self.explore = explore
        self.cache_dir = cache_dir

    def store(self) -> Store:
        """The store, read-only."""
        return Store(self.root, readonly=True)
