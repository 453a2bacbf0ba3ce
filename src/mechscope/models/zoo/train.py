"""Train a zoo checkpoint from its recipe and write every file of it.

:func:`train_zoo` boots a TransformerLens-native ``TransformerBridge`` from the recipe's config,
trains it through the bridge's own forward (gradients reach the native model's parameters, which
are the bridge's ``state_dict``), then writes ``config.json``, ``model.safetensors`` (float32),
``ground_truth.json`` (:mod:`mechscope.models.zoo.truth`), ``card.json`` and ``card.md``.

Training: AdamW, linear warm-up then cosine decay to 10% of the learning rate, gradient clipping at
1.0, cross-entropy on the masked positions only, and optionally a proximal group-lasso step on
each attention head (``recipe.head_l1``: after every optimiser step each head's parameter norm
shrinks by ``lr * head_l1``), so heads the task does not need reach zero and stay spare; and
optionally frozen sinusoidal positions (``recipe.pos_embed``). ``recipe.threads`` CPU threads;
the data generator and the model initialisation are seeded from the recipe, so a rerun on the
same machine gives the same weights (checked: the shipped ``zoo:retrieval`` retrained bit for
bit); across machines float reductions differ in the last bits and training amplifies that
(facts-attn retrained elsewhere: weights up to 0.2 apart, accuracy equal, patching effects within
0.03), so a retrain reproduces accuracy within a point, not the weights.

Training leaves the process as it found it: the global torch, numpy and ``random`` generator
states and ``torch.get_num_threads()`` are restored afterwards. Without ``out_dir`` the checkpoint
goes to the user cache folder (``$MECHSCOPE_CACHE`` or the platform's, under ``zoo/``); the
package's shipped checkpoints are never written (an ``out_dir`` inside the package is refused).

Caveat: ``steps`` overrides the recipe for quick tests; such a checkpoint is complete and
loadable but does not solve its task, and its card says so (``recipe.steps`` is the value used).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mechscope.errors import SpecError, WeightFileError
from mechscope.models.zoo.data import TRAIN_STREAMS
from mechscope.models.zoo.recipes import RECIPES, Recipe

if TYPE_CHECKING:
    from mechscope.models.zoo import ZooCard
    from mechscope.types import Model

log = logging.getLogger(__name__)


@contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore the global torch/numpy/``random`` generator states and torch's CPU thread count
    on exit, whatever the block changed."""
    torch_state = torch.random.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        torch.set_num_threads(threads)


def default_out_dir() -> Path:
    """Where ``train_zoo`` writes without ``out_dir``: ``<cache>/zoo`` (see
    :func:`mechscope.models.loading.cache_root`)."""
    from mechscope.models.loading import cache_root

    return cache_root() / "zoo"


def _check_out_dir(root: Path, name: str) -> Path:
    """Refuse a folder inside the installed package (its shipped checkpoints are read-only) and
    a ``root / name`` that exists but is not a zoo checkpoint (it would be replaced)."""
    import mechscope
    from mechscope.models.zoo import is_zoo_checkpoint

    package = Path(mechscope.__file__).resolve().parent
    root = root.expanduser()
    resolved = root.resolve()
    if resolved == package or package in resolved.parents:
        raise SpecError(
            f"--out {root} is inside the mechscope package ({package}); its shipped checkpoints "
            "are never overwritten. Leave --out out (the user cache folder) or give a folder "
            "outside the package"
        )
    target = root / name
    if target.exists() and not is_zoo_checkpoint(target):
        raise WeightFileError(
            f"{target} exists and is not a zoo checkpoint; training would replace it. Move it "
            "away or give another --out folder"
        )
    return root


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise SpecError(f"no zoo recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def _lr_at(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def head_group_norms(model: Model) -> torch.Tensor:
    """L2 norm of each attention head's parameters, ``[n_layers, n_heads]`` (differentiable)."""
    squares = (model.W_Q.square().sum((-2, -1)) + model.W_K.square().sum((-2, -1))
               + model.W_V.square().sum((-2, -1)) + model.W_O.square().sum((-2, -1))
               + model.b_Q.square().sum(-1) + model.b_K.square().sum(-1)
               + model.b_V.square().sum(-1))  # fmt: skip
    return squares.clamp_min(1e-12).sqrt()


def head_parameters(model: Model) -> list[tuple[torch.Tensor, int, int]]:
    """``(parameter, layer, axis)`` for every attention parameter that splits into heads along
    ``axis`` in blocks of ``d_head`` (Q/K/V weights and biases by row, O weights by column).

    Checked against the bridge's own ``W_Q``/``W_O`` views, so a layout change fails loudly.
    """
    found: list[tuple[torch.Tensor, int, int]] = []
    dh = model.cfg.d_head
    for name, param in model.named_parameters():
        m = re.search(r"layers\.(\d+)\..*attn\..*\b([qkvo])\._original_component\.(weight|bias)$",
                      name)  # fmt: skip
        if m is None or (m.group(2) == "o" and m.group(3) == "bias"):
            continue
        found.append((param, int(m.group(1)), 1 if m.group(2) == "o" else 0))
    if len(found) != 7 * model.cfg.n_layers:
        raise RuntimeError(f"expected 7 per-head attention parameters per layer, found {len(found)}")
    q = next(p for p, layer, _ in found if layer == 0 and p.dim() == 2)
    o = next(p for p, layer, axis in found if layer == 0 and axis == 1)
    if not (torch.equal(q[:dh].T, model.W_Q[0, 0]) and torch.equal(o[:, :dh].T, model.W_O[0, 0])):
        raise RuntimeError("the bridge's attention weights are not laid out head by head")
    return found


@torch.no_grad()
def shrink_heads(model: Model, params: list[tuple[torch.Tensor, int, int]], amount: float) -> None:
    """Proximal group-lasso step: shrink each head's parameter norm by ``amount`` (to 0 at most)."""
    if amount <= 0:
        return
    scale = (1 - amount / head_group_norms(model)).clamp_min(0.0)  # [layer, head]
    dh = model.cfg.d_head
    for param, layer, axis in params:
        per_head = scale[layer].repeat_interleave(dh)
        param.mul_(per_head[:, None] if axis == 0 and param.dim() == 2 else per_head)


def sinusoidal(n_ctx: int, d_model: int, rms: float) -> torch.Tensor:
    """The sinusoidal position table of Vaswani et al. (2017), scaled to root-mean-square ``rms``.

    >>> t = sinusoidal(16, 8, rms=0.1)
    >>> tuple(t.shape), round(float(t.square().mean().sqrt()), 3)
    ((16, 8), 0.1)
    """
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return (table * rms / table.square().mean().sqrt()).float()


def _fix_positions(model: Model) -> None:
    """Overwrite the learned position table with a frozen sinusoidal one (``pos_embed``)."""
    pos = [p for name, p in model.named_parameters() if re.match(r"pos\..*weight$", name)]
    if len(pos) != 1 or pos[0].shape != model.W_pos.shape:
        raise RuntimeError("could not find the bridge's position-embedding table")
    with torch.no_grad():
        n_ctx, d_model = pos[0].shape
        pos[0].copy_(sinusoidal(n_ctx, d_model, rms=float(model.W_E.square().mean().sqrt())))
    pos[0].requires_grad_(False)


def _l1_at(recipe: Recipe, step: int) -> float:
    start = recipe.head_l1_from * recipe.steps
    if step >= recipe.head_l1_until * recipe.steps:
        return 0.0
    ramp = (step - start) / max(1.0, 0.1 * recipe.steps)
    return recipe.head_l1 * min(1.0, max(0.0, ramp))


def train_model(recipe: Recipe, *, progress: bool = True) -> tuple[Model, float, list[float]]:
    """Train a fresh model on ``recipe``; returns (model in eval mode, seconds, loss curve).

    The global generator states and thread count are restored afterwards.
    """
    with preserved_global_state():
        return _train_model(recipe, progress=progress)


def _train_model(recipe: Recipe, *, progress: bool) -> tuple[Model, float, list[float]]:
    from mechscope.models.native import boot_native_config

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    model = boot_native_config(recipe.model_config())
    if recipe.pos_embed == "sinusoidal":
        _fix_positions(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    stream = TRAIN_STREAMS[recipe.task]
    heads = head_parameters(model) if recipe.head_l1 > 0 else []
    rng = np.random.default_rng([recipe.seed, 0xD00])
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=f"zoo:{recipe.name}", disable=not progress, mininterval=2)
    for step in bar:
        tokens, mask = stream(recipe, rng, step)
        for group in opt.param_groups:
            group["lr"] = _lr_at(recipe, step)
        logits = model(tokens)[:, :-1]  # [batch, pos-1, vocab]
        loss = torch.nn.functional.cross_entropy(logits[mask], tokens[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if recipe.head_l1 > 0:
            shrink_heads(model, heads, _lr_at(recipe, step) * _l1_at(recipe, step))
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            bar.set_postfix(loss=f"{float(np.mean(losses[-100:])):.3f}")
    seconds = time.perf_counter() - start
    log.info("zoo:%s trained %d steps in %.0f s", recipe.name, recipe.steps, seconds)
    return model.eval(), seconds, losses


def save_weights(model: Model, directory: Path, recipe: Recipe) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(recipe.model_config(), indent=2) + "\n")


def train_zoo(
    name: str, *, out_dir: str | Path | None = None, steps: int | None = None, progress: bool = True
) -> ZooCard:
    """Train checkpoint ``name`` from ``RECIPES[name]`` and write it with its ground truth.

    Args:
        name: a key of :data:`~mechscope.models.zoo.recipes.RECIPES`.
        out_dir: the folder that holds checkpoint folders (the checkpoint is written to
            ``out_dir / name``, replacing an earlier checkpoint there); ``None`` = the user cache
            folder (:func:`default_out_dir`). A folder inside the installed package is refused.
        steps: override the recipe's number of steps (quick tests).
        progress: a tqdm bar on stderr.

    Returns:
        The new checkpoint's :class:`~mechscope.models.zoo.ZooCard`; ``load(str(card.directory))``
        loads it.
    """
    from mechscope.models.zoo import zoo_card

    recipe = get_recipe(name)
    if steps is not None:
        if int(steps) < 1:
            raise SpecError(f"--steps must be at least 1, got {steps}")
        recipe = replace(
            recipe, steps=int(steps), warmup=min(recipe.warmup, max(1, int(steps) // 2))
        )
    root = _check_out_dir(default_out_dir() if out_dir is None else Path(out_dir), name)
    with preserved_global_state():
        model, seconds, losses = train_model(recipe, progress=progress)
        torch.set_num_threads(recipe.threads)  # ground truth on the same threads as training
        write_checkpoint(model, recipe, root / name, seconds=seconds, losses=losses,
                         small=steps is not None and steps < 100)  # fmt: skip
        return zoo_card(name, root=root)


def write_checkpoint(
    model: Model, recipe: Recipe, directory: Path, *, seconds: float, losses: list[float],
    small: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write weights, config, ground truth and card of a trained ``model`` into ``directory``.

    Everything is written to a sibling temporary folder first and swapped in at the end, so a
    failure never leaves a half-written checkpoint where ``load_zoo`` would find it.
    """
    from mechscope._fs import apply_umask
    from mechscope.models.zoo.cards import write_card
    from mechscope.models.zoo.truth import ground_truth

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_weights(model, staging, recipe)
        truth = ground_truth(model, recipe, small=small)
        (staging / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        tail = losses[-50:] or [float("nan")]
        card = write_card(staging, recipe, truth, seconds=seconds, final_loss=float(np.mean(tail)))
        apply_umask(staging)  # mkdtemp and safetensors make owner-only modes; the umask decides
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return card
