"""Tiny TransformerLens-native models built from a config (``native:`` specs and the zoo).

``native:`` specs accept JSON (``native:{"n_layers": 2, ...}``) or ``key=value`` pairs
(``native:n_layers=2,d_model=64,attn_only=true``). Fields are those of TransformerLens's
``TransformerBridgeConfig``; unset fields take the defaults below, so a spec stays short.

>>> cfg = parse_native_spec("n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,attn_only=true")
>>> cfg["n_layers"], cfg["attn_only"], cfg["seed"]
(1, True, 0)
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import SpecError, WeightFileError

if TYPE_CHECKING:
    from mechscope.types import Model

NATIVE_DEFAULTS: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "n_ctx": 128,
    "d_vocab": 64,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "seed": 0,
}


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in {"true", "false"}:
        return low == "true"
    if low in {"none", "null"}:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip().strip("'\"")


def parse_native_spec(body: str) -> dict[str, Any]:
    """Turn the part after ``native:`` into a full config dict (defaults filled in)."""
    body = body.strip()
    config: dict[str, Any]
    if body.startswith("{"):
        try:
            config = json.loads(body)
        except json.JSONDecodeError as exc:
            raise SpecError(f"native spec is not valid JSON: {exc}") from exc
    else:
        config = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            if "=" not in part:
                raise SpecError(
                    f"native spec part {part!r} is not key=value; "
                    "write e.g. native:n_layers=2,d_model=64,n_heads=4,d_head=16,d_vocab=50"
                )
            key, value = part.split("=", 1)
            config[key.strip()] = _parse_value(value)
    full = {**NATIVE_DEFAULTS, **config}
    if full.get("attn_only"):
        full.pop("d_mlp", None)
    elif "d_mlp" not in full:
        full["d_mlp"] = 4 * int(full["d_model"])
    return full


def boot_native_config(config: dict[str, Any], *, device: str | None = None) -> Model:
    """Boot a random TransformerLens-native bridge from a config dict, in eval mode."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    known = set(inspect.signature(TransformerBridgeConfig.__init__).parameters) - {"self", "kwargs"}
    for klass in TransformerBridgeConfig.__mro__:
        known |= set(getattr(klass, "__dataclass_fields__", {}))
    unknown = sorted(set(config) - known)
    if unknown:
        close = {u: [k for k in known if u.lower() in k.lower()][:3] for u in unknown}
        raise SpecError(f"unknown native config fields {unknown} (close names: {close})")
    try:
        model = TransformerBridge.boot_native(dict(config), device=device)  # type: ignore[attr-defined]
    except (ValueError, TypeError, AssertionError) as exc:
        raise SpecError(f"TransformerLens cannot build this native config {config}: {exc}") from exc
    return model.eval()


def load_state_strict(model: Model, path: Path) -> None:
    """Load a safetensors state dict into ``model``, asserting every key and shape."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (a RuntimeError-like)
        raise WeightFileError(f"weight file {path} is unreadable or corrupt: {exc}") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or wrong:
        raise WeightFileError(
            f"weight file {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
