"""How big a trace will be, before any forward runs, and the memory budget that refuses a too-big one.

The estimate is exact for what the tracer keeps: per site and layer, the captured shape (from the
site's axes in :mod:`mechscope.probes.sites`, with the ``layers``/``heads``/``kv_heads``/
``positions`` restrictions applied) times the stored dtype's size. An in-memory run keeps every
prompt, right-padded to the longest prompt; a streamed run (``out_dir=``) keeps one batch at a
time, so its capture is the largest batch's. A gradient run keeps as much again for the grads.

On top comes a rough *working* memory of the forward itself, which is what kills a process on a
long prompt even when little is captured: the attention scores and the pattern of one layer
(``batch × n_heads × pos² × 4 B``, each) and the logits (``batch × pos × d_vocab × 4 B``); a
gradient run keeps the scores and patterns of every layer alive for the backward.

The budget is ``TraceConfig.max_bytes``; when it is None, the environment variable
``MECHSCOPE_MAX_BYTES`` (bytes, or with a suffix: ``16G``, ``512M``); else 4 GiB.

>>> human(3 * 2**30)
'3.0 GiB'
>>> parse_bytes("512M")
536870912
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from mechscope.errors import InputError
from mechscope.probes.sites import SITE_SPECS

DEFAULT_MAX_BYTES = 4 * 2**30
ENV_VAR = "MECHSCOPE_MAX_BYTES"
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human(n: int | float) -> str:
    """Bytes as a short string in binary units."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """``"4294967296"``, ``"16G"``, ``"512MiB"`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in _SUFFIX:
            return int(float(t[:-1]) * _SUFFIX[t[-1]])
        return int(float(t))
    except ValueError:
        raise InputError(f"cannot read {text!r} as a number of bytes (e.g. 8G, 512M)") from None


def max_bytes(configured: int | None) -> int:
    """The budget in force: the configured value, else ``$MECHSCOPE_MAX_BYTES``, else 4 GiB."""
    if configured is not None:
        return configured
    env = os.environ.get(ENV_VAR)
    return parse_bytes(env) if env else DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Sizes:
    """Axis sizes of one model and restriction (what a site's dims resolve to)."""

    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_layers: int


def site_shape(site: str, sizes: Sizes, *, batch: int, pos: int, n_pos: int | None,
               heads: int | None, kv_heads: int | None) -> tuple[int, ...]:
    """The shape a site's tensor will have (``n_pos``: positions kept, None for all)."""
    dims = {
        "batch": batch, "pos": n_pos if n_pos is not None else pos, "key": pos,
        "head": heads if heads is not None else sizes.n_heads,
        "kv_head": kv_heads if kv_heads is not None else sizes.n_kv_heads,
        "d_head": sizes.d_head, "d_model": sizes.d_model, "d_mlp": sizes.d_mlp,
    }  # fmt: skip
    dims["query"] = dims["pos"]
    return tuple(dims[d] for d in SITE_SPECS[site].dims)


@dataclass(frozen=True)
class Estimate:
    """Bytes a trace will hold (``capture``, exact) and the forward's rough ``working`` memory."""

    capture: int
    working: int
    by_site: dict[str, int] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.capture + self.working


def estimate(sizes: Sizes, *, sites: tuple[str, ...], n_layers: int, batches: list[tuple[int, int]],
             streamed: bool, itemsize: int, n_pos: int | None, heads: int | None,
             kv_heads: int | None, grad: bool) -> Estimate:
    """Estimate a run over ``batches`` (``(n_prompts, padded_length)`` per forward)."""
    def captured(batch: int, pos: int) -> tuple[dict[str, int], dict[str, str]]:
        by_site: dict[str, int] = {}
        detail: dict[str, str] = {}
        for site in sites:
            shape = site_shape(site, sizes, batch=batch, pos=pos, n_pos=n_pos, heads=heads,
                               kv_heads=kv_heads)
            by_site[site] = math.prod(shape) * itemsize * n_layers * (2 if grad else 1)
            dims = " × ".join(str(s) for s in shape)
            detail[site] = f"{n_layers} layers × [{dims}] × {itemsize} B" + (
                " × 2 (grads)" if grad else "")
        return by_site, detail

    if streamed:
        by_site, detail = max((captured(b, p) for b, p in batches),
                              key=lambda bd: sum(bd[0].values()))
    else:
        by_site, detail = captured(sum(b for b, _ in batches), max(p for _, p in batches))
    fb, fp = max(batches, key=lambda b: b[0] * b[1] ** 2)
    scores = fb * sizes.n_heads * fp * fp * 4
    working = 2 * scores * (sizes.n_layers if grad else 1) + fb * fp * sizes.d_vocab * 4
    return Estimate(capture=sum(by_site.values()), working=working, by_site=by_site, detail=detail)


def check(est: Estimate, budget: int, *, longest: int) -> None:
    """Raise :class:`InputError` with the estimate and the fixes when it exceeds ``budget``."""
    if est.total <= budget:
        return
    parts = [f"{s}: {human(b)} ({est.detail[s]})" for s, b in
             sorted(est.by_site.items(), key=lambda kv: -kv[1]) if b]
    raise InputError(
        f"this trace is estimated at {human(est.total)}, over the memory budget of "
        f"{human(budget)}: captured {human(est.capture)} [{'; '.join(parts) or 'nothing'}] plus "
        f"~{human(est.working)} for the forward itself (attention scores and patterns of "
        f"{longest}² positions, logits). Capture fewer sites or layers, restrict "
        "positions=(-1,) or heads=, stream with out_dir= (keeps one batch), lower batch_size, "
        f"shorten the prompts, or raise the budget: TraceConfig(max_bytes=...) or {ENV_VAR}=16G"
    )
