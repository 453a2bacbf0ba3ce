"""Spec parsing and the loaders behind :func:`mechscope.models.load`.

Nothing here unpickles: weights come from safetensors, GGUF, or ``torch.load(weights_only=True)``
inside ``transformers``. Nothing reaches the network unless the spec names a hub model.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import (
    ArchitectureError,
    MechscopeError,
    OfflineError,
    SpecError,
    WeightFileError,
)

if TYPE_CHECKING:  # at run time: importing transformer_lens costs ~5 s, too much for listings
    from mechscope.types import Model

# The spec of a loaded model is kept on the bridge under this attribute (see spec_of).
_SPEC_ATTR = "_mechscope_spec"


@dataclass(frozen=True)
class ModelInfo:
    """A loadable model and its shape, as ``mechscope models`` lists it."""

    spec: str
    kind: str
    description: str
    available: bool
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_model: int | None = None
    d_mlp: int | None = None
    d_vocab: int | None = None
    n_ctx: int | None = None
    install: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Individual loaders. Each takes the spec's body (after the ``kind:`` prefix) and a device.


def _load_native(body: str, device: str | None) -> Model:
    from mechscope.models.native import boot_native_config, parse_native_spec

    return boot_native_config(parse_native_spec(body), device=device)


def _load_zoo(body: str, device: str | None) -> Model:
    from mechscope.models.zoo import load_zoo

    if not body:
        raise SpecError("write a zoo spec as zoo:<name>; `mechscope zoo list` shows the names")
    return load_zoo(body, device=device)


def _load_smollm2(body: str, device: str | None) -> Model:
    from mechscope.models.smollm2 import load_smollm2

    return load_smollm2(device=device)


def _load_minilm(body: str, device: str | None) -> Model:
    from mechscope.models.hf import boot_hf_dir, minilm_dir

    return boot_hf_dir(minilm_dir(), device=device)


def _load_local(body: str, device: str | None) -> Model:
    from mechscope.models.hf import boot_gguf_file, boot_hf_dir
    from mechscope.models.zoo import is_zoo_checkpoint, load_zoo

    path = Path(body).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return boot_gguf_file(path, device=device)
    if is_zoo_checkpoint(path):  # a zoo checkpoint folder (shipped, copied or `zoo train --out`)
        path = path.resolve()
        return load_zoo(path.name, device=device, root=path.parent)
    return boot_hf_dir(path, device=device)


def _load_hub(body: str, device: str | None) -> Model:
    from mechscope.models.hf import boot_hub

    return boot_hub(body, device=device)


Loader = Callable[[str, str | None], "Model"]

#: Spec kinds: ``prefix -> loader``. Named models have no body (``smollm2``).
SPEC_KINDS: dict[str, Loader] = {
    "native": _load_native,
    "zoo": _load_zoo,
    "smollm2": _load_smollm2,
    "minilm": _load_minilm,
    "local": _load_local,
    "hub": _load_hub,
}
_NAMED = {"smollm2", "minilm"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_spec(spec: str) -> tuple[str, str]:
    """Split a spec into ``(kind, body)``; raise :class:`SpecError` for an unknown one."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("the model spec is empty; try `smollm2`, `minilm`, `zoo:<name>` or a path")
    spec = spec.strip()
    if spec.lower() in _NAMED:
        return spec.lower(), ""
    prefix, sep, body = spec.partition(":")
    if sep and prefix in ("native", "zoo"):
        return prefix, body
    path = Path(spec).expanduser()
    if path.exists():
        return "local", str(path)
    if _HUB_NAME.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise SpecError(
        f"unknown model spec {spec!r}. Use one of: smollm2, minilm, zoo:<name> "
        "(see `mechscope zoo list`), native:<key=value,...>, a local Hugging Face directory or "
        ".gguf file that exists, or a hub name like org/model (needs a network)."
    )


def load(spec: str, *, device: str | None = None) -> Model:
    """Load a model from a spec: a ``TransformerBridge`` in eval mode with its tokenizer.

    Args:
        spec: ``smollm2``, ``minilm``, ``zoo:<name>``, ``native:<config>``, a local directory
            (a Hugging Face folder, or a zoo checkpoint folder: ``card.json`` + ``config.json`` +
            ``model.safetensors``) or ``.gguf`` file, or a hub name.
        device: torch device; the default is the CPU.

    Loading leaves the global torch random state alone and shows no weight-loading progress
    bars (``transformers``' own progress-bar setting is restored afterwards).

    Raises:
        SpecError: unknown spec. MissingPackageError: the optional package (with the pip
        command). WeightFileError: unreadable/corrupt weights. ArchitectureError: TransformerLens
        cannot bridge it. OfflineError: a hub model without a network.
    """
    kind, body = resolve_spec(spec)
    with quiet_loading(), torch.random.fork_rng(devices=[]):
        model = SPEC_KINDS[kind](body, device)
    model.eval()
    object.__setattr__(model, _SPEC_ATTR, spec.strip())
    return model


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide ``transformers``' (and the hub's) progress bars, such as "Loading weights", inside
    the block, then put both settings back as they were."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also disables the hub's
    try:
        yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()  # also enables the hub's
        if hub_bars_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def spec_of(model: Model) -> str | None:
    """The spec a model was loaded from, or None when it did not come from :func:`load`."""
    return getattr(model, _SPEC_ATTR, None)


def fingerprint(model: Model) -> str:
    """A short, cheap hash of a model's architecture and weights (for the run store).

    Hashes every parameter's name, shape and dtype, and a strided sample of its values, so any
    retraining or different checkpoint changes it, without reading 100s of MB.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].to(torch.float64).cpu().numpy().tobytes()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample)
    return h.hexdigest()[:16]


def spec_kind(spec: str | None) -> str:
    """The kind of a spec (a key of :data:`SPEC_KINDS`), or ``""`` when it resolves to none.

    >>> spec_kind("zoo:induction"), spec_kind("smollm2"), spec_kind("no such thing")
    ('zoo', 'smollm2', '')
    """
    if not spec:
        return ""
    try:
        return resolve_spec(spec)[0]
    except SpecError:
        return ""


def describe(model: Model, spec: str | None = None, kind: str | None = None) -> ModelInfo:
    """A :class:`ModelInfo` read off a loaded model's config.

    ``spec`` defaults to the one the model was loaded from; ``kind`` to that spec's kind
    (:func:`resolve_spec`: ``smollm2``, ``minilm``, ``zoo``, ``native``, ``local``, ``hub``).
    """
    cfg = model.cfg
    spec = spec or spec_of(model)
    d_mlp: int | None = getattr(cfg, "d_mlp", None)
    return ModelInfo(
        spec=spec or "?",
        kind=kind if kind is not None else spec_kind(spec),
        description=str(getattr(cfg, "model_name", "")),
        available=True,
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        d_mlp=int(d_mlp) if d_mlp else None,
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
    )


def cache_root() -> Path:
    """Where mechscope caches files (converted weights, trained zoo checkpoints):
    ``$MECHSCOPE_CACHE`` or the user cache directory (``platformdirs``)."""
    env = os.environ.get("MECHSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mechscope"))


def list_models() -> list[ModelInfo]:
    """What can be loaded here, with shapes, without loading weights."""
    from mechscope.models.hf import MINILM_INFO, minilm_available
    from mechscope.models.native import NATIVE_DEFAULTS
    from mechscope.models.smollm2 import SMOLLM2_INFO, smollm2_available
    from mechscope.models.zoo import list_zoo

    infos = [
        ModelInfo(**{**SMOLLM2_INFO.to_dict(), "available": smollm2_available()}),
        ModelInfo(**{**MINILM_INFO.to_dict(), "available": minilm_available()}),
    ]
    for card in list_zoo():
        c = card.config
        infos.append(
            ModelInfo(
                spec=f"zoo:{card.name}",
                kind="zoo",
                description=f"{card.description} (accuracy {card.accuracy:.3f})",
                available=True,
                n_layers=c.get("n_layers"),
                n_heads=c.get("n_heads"),
                n_kv_heads=c.get("n_heads"),
                d_head=c.get("d_head"),
                d_model=c.get("d_model"),
                d_mlp=None if c.get("attn_only") else c.get("d_mlp"),
                d_vocab=c.get("d_vocab"),
                n_ctx=c.get("n_ctx"),
            )
        )
    d = NATIVE_DEFAULTS
    infos.append(
        ModelInfo(
            spec="native:<key=value,...>",
            kind="native",
            description="tiny random TransformerLens-native model; defaults shown, any field can be set",
            available=True,
            n_layers=d["n_layers"],
            n_heads=d["n_heads"],
            n_kv_heads=d["n_heads"],
            d_head=d["d_head"],
            d_model=d["d_model"],
            d_mlp=4 * d["d_model"],
            d_vocab=d["d_vocab"],
            n_ctx=d["n_ctx"],
        )
    )
    return infos


def hub_offline() -> bool:
    """True when the hub is known to be unreachable (set HF_HUB_OFFLINE=1 to skip the probe)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return True
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


__all__ = [
    "SPEC_KINDS",
    "ArchitectureError",
    "MechscopeError",
    "ModelInfo",
    "OfflineError",
    "WeightFileError",
    "cache_root",
    "describe",
    "fingerprint",
    "list_models",
    "load",
    "quiet_loading",
    "resolve_spec",
    "spec_kind",
    "spec_of",
]
