"""The zoo: small models trained by mechscope on tasks whose mechanism is known.

Each checkpoint lives in ``checkpoints/<name>/``:

- ``config.json``: the ``TransformerBridgeConfig`` fields given to ``TransformerBridge.boot_native``;
- ``model.safetensors``: the bridge's ``state_dict()`` (loaded strictly: every key and shape);
- ``card.json``: task, recipe (all hyper-parameters and the seed), accuracy on fresh samples,
  the known mechanism, how it was verified, and the circuit heads with the rule that defines them;
- ``card.md``: the same card for people;
- ``ground_truth.json``: per-head scores and the exhaustive activation-patching effect table.

``mechscope zoo train <name>`` regenerates every file of a checkpoint from its recipe
(:func:`train_zoo`, recipes in :data:`RECIPES`) into the user cache folder (or ``--out``), never
into the package: the shipped checkpoints are never overwritten. A checkpoint folder anywhere loads
by its path (``load("/path/to/induction")``; :func:`is_zoo_checkpoint`).

Submodules: ``recipes`` (the table), ``data`` (training streams and evaluation batches), ``train``
(the loop), ``truth`` (computing ground truth: head scores, exhaustive activation patching with
mechscope's tracer and interventions, circuit rule, ablations), ``groundtruth`` (the typed
:class:`~mechscope.models.zoo.groundtruth.GroundTruth` and detector scoring against it),
``cards`` (card files).

Caveat: a checkpoint is only as good as its ground truth; read ``card.md`` for what was verified.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.errors import SpecError, WeightFileError

if TYPE_CHECKING:
    from mechscope.models.zoo.groundtruth import GroundTruth
    from mechscope.types import Model

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
#: The files that make a folder a zoo checkpoint (``ground_truth.json`` and ``card.md`` too, but
#: these three are what loading needs).
CHECKPOINT_FILES = ("card.json", "config.json", "model.safetensors")


@dataclass(frozen=True)
class ZooCard:
    """What a zoo checkpoint is: read from its ``card.json``."""

    name: str
    task: str
    description: str
    accuracy: float
    circuit_heads: tuple[tuple[int, int], ...]
    config: dict[str, Any]
    card: dict[str, Any]
    root: Path = CHECKPOINTS

    @property
    def directory(self) -> Path:
        return self.root / self.name

    def ground_truth(self) -> GroundTruth:
        """The checkpoint's ``ground_truth.json`` as a typed :class:`GroundTruth`."""
        from mechscope.models.zoo.groundtruth import GroundTruth

        return GroundTruth.load(self.directory)

    def summary(self) -> str:
        """One line: name, accuracy, circuit heads, description."""
        heads = " ".join(f"L{a}H{b}" for a, b in self.circuit_heads) or "-"
        mlps = "".join(f" MLP{m}" for m in self.card.get("circuit_mlps", []))
        return (
            f"zoo:{self.name}  acc={self.accuracy:.3f}  circuit=[{heads}{mlps}]  {self.description}"
        )


def zoo_names(root: Path | None = None) -> list[str]:
    """Names of the shipped checkpoints (or those under ``root``), sorted."""
    root = CHECKPOINTS if root is None else Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and (p / "card.json").is_file()  # "." = being written
    )


def is_zoo_checkpoint(path: str | Path) -> bool:
    """True for a folder in the zoo format: ``card.json``, ``config.json``, ``model.safetensors``."""
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() for f in CHECKPOINT_FILES)


def _unknown_zoo_model(name: str, root: Path) -> SpecError:
    from mechscope.models.zoo.recipes import RECIPES

    known = ", ".join(f"zoo:{n}" for n in zoo_names(root)) or "none"
    where = "shipped" if root == CHECKPOINTS else f"in {root}"
    if name in RECIPES:
        fix = (f"`mechscope zoo train {name}` trains it from its recipe and prints the folder it "
               "wrote; load that folder by its path")
    else:
        fix = (f"`mechscope zoo list` describes them. `mechscope zoo train NAME` retrains one of "
               f"the recipes {', '.join(sorted(RECIPES))} and prints the folder it wrote; a "
               "checkpoint folder loads by its path")
    return SpecError(f"unknown zoo model {name!r}. Known ({where}): {known}. {fix}.")


def zoo_card(name: str, *, root: Path | None = None) -> ZooCard:
    """The card of checkpoint ``name``; a :class:`SpecError` names the known ones otherwise."""
    root = CHECKPOINTS if root is None else Path(root)
    directory = root / name
    if not name or "/" in name or name.startswith(".") or not (directory / "card.json").is_file():
        raise _unknown_zoo_model(name, root)
    try:
        card = json.loads((directory / "card.json").read_text())
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        from mechscope.models.zoo.recipes import RECIPES

        if root == CHECKPOINTS:
            fix = "The shipped files are damaged: reinstall mechscope"
        elif name in RECIPES:
            fix = f"Retrain it: `mechscope zoo train {name} --out {shlex.quote(str(root))}`"
        else:
            fix = "Copy the checkpoint again from where it came from"
        raise WeightFileError(
            f"zoo checkpoint {name!r} has an unreadable card or config in {directory}: {exc}. "
            f"{fix}."
        ) from exc
    return ZooCard(
        name=name,
        task=str(card.get("task", "")),
        description=str(card.get("description", "")),
        accuracy=float(card.get("accuracy", float("nan"))),
        circuit_heads=tuple(tuple(h) for h in card.get("circuit_heads", [])),  # type: ignore[misc]
        config=config,
        card=card,
        root=root,
    )


def list_zoo(root: Path | None = None) -> list[ZooCard]:
    """Every shipped checkpoint's card (accuracy and circuit heads included)."""
    return [zoo_card(n, root=root) for n in zoo_names(root)]


def load_zoo(name: str, *, device: str | None = None, root: Path | None = None) -> Model:
    """Boot checkpoint ``name`` as a ``TransformerBridge`` in eval mode, loading weights strictly.

    Weights stored as float16 are converted to float32 (the config's dtype) on load.
    """
    from mechscope.models.native import boot_native_config, load_state_strict

    card = zoo_card(name, root=root)
    weights = card.directory / "model.safetensors"
    model = boot_native_config(card.config, device=device)
    load_state_strict(model, weights)
    return model.eval()


def __getattr__(attr: str) -> Any:
    # Training code imports torch, numpy and the task generators: load it on first use only.
    if attr == "train_zoo":
        from mechscope.models.zoo.train import train_zoo

        return train_zoo
    if attr in ("RECIPES", "Recipe"):
        from mechscope.models.zoo import recipes

        return getattr(recipes, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["CHECKPOINTS", "CHECKPOINT_FILES", "RECIPES", "Recipe", "ZooCard", "is_zoo_checkpoint",
           "list_zoo", "load_zoo", "train_zoo", "zoo_card", "zoo_names"]  # fmt: skip
