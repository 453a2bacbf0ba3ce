"""The typed ground truth of a zoo checkpoint (``ground_truth.json``) and how detectors are scored.

:class:`GroundTruth` is what :func:`mechscope.models.zoo.truth.compute_ground_truth` measures
(how, in that module's docstring) and what ``ground_truth.json`` stores (format 2). It holds:

- accuracy on fresh prompts and per-head scores (previous-token, induction, copy, local, ...);
- the per-head activation-patching tables (all positions, both directions, mean over the patch
  batches) and the circuit they define (:data:`THRESHOLD`);
- per-position tables (:class:`PositionTables`): heads ``[layer, pos, head]``, ``resid_pre``
  ``[layer, pos]`` and ``mlp_out`` ``[layer, pos]``, both directions, each stored with the batch
  it was computed on (:class:`PatchBatch`: generator, recipe, n, seed, index and a checksum of
  the tokens), so a test can regenerate that exact batch and compare another patching engine
  with these numbers;
- for retrieval, the ablation that defines the retrieval heads (:class:`RetrievalTruth`).

Detector scoring (:meth:`GroundTruth.score_heads`) compares a detector's per-head scores with
the truth both ways: ROC-AUC against circuit membership, and a concordance index (Harrell's C)
against the continuous patching effect, which does not depend on where the threshold falls (some
heads sit next to it: induction L1H0 and facts-attn L1H1 at 0.19).

>>> truth = GroundTruth.load("zoo:induction")
>>> truth.circuit_heads
((0, 0), (1, 1), (1, 2), (1, 3))
>>> truth.score_heads(truth.effect())["concordance_effect"]
1.0
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mechscope.errors import InputError, WeightFileError

if TYPE_CHECKING:
    from mechscope.tasks.base import TaskBatch

FORMAT = 2
THRESHOLD = 0.2
Array = np.ndarray


def _arr(x: Any) -> Array:
    """A float array from nested lists (``None`` -> NaN)."""
    return np.array(x, dtype=np.float64)


def _lst(a: Array | None) -> Any:
    if a is None:
        return None
    return [_lst(x) for x in a] if a.ndim > 1 else [None if np.isnan(v) else float(v) for v in a]


def batch_checksum(batch: TaskBatch) -> str:
    """sha1 of a batch's clean, corrupt, answer, corrupt_answer and answer_pos (as int64)."""
    h = hashlib.sha1()
    for t in (batch.clean, batch.corrupt, batch.answer, batch.corrupt_answer, batch.answer_pos):
        h.update(t.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class PatchBatch:
    """Which clean/corrupt batch a patching table was computed on.

    Attributes:
        recipe: the recipe name (``RECIPES[recipe]`` holds the task parameters).
        task: the task family; the batch is ``data.PATCH_BATCHES[task](recipe, n, seed)[index]``.
        n: rows asked of the generator (over all of its batches).
        seed: the generator's seed.
        index: which of the generator's batches (e.g. which depth for retrieval).
        shape: ``[batch, pos]`` of the batch.
        sha1: :func:`batch_checksum` of the batch, to check a regenerated one.
    """

    recipe: str
    task: str
    n: int
    seed: int
    index: int
    shape: tuple[int, int]
    sha1: str

    @property
    def generator(self) -> str:
        return f"mechscope.models.zoo.data.PATCH_BATCHES[{self.task!r}]"

    def batch(self) -> TaskBatch:
        """Regenerate the batch; raises if its tokens differ from the ones the table used."""
        from mechscope.models.zoo.data import PATCH_BATCHES
        from mechscope.models.zoo.recipes import RECIPES

        b: TaskBatch = PATCH_BATCHES[self.task](RECIPES[self.recipe], self.n, self.seed)[self.index]
        if batch_checksum(b) != self.sha1:
            raise InputError(f"the regenerated patch batch {self} differs from the stored one "
                             "(the generator changed); recompute the ground truth")  # fmt: skip
        return b

    def to_dict(self) -> dict[str, Any]:
        return {"generator": self.generator, "recipe": self.recipe, "task": self.task,
                "n": self.n, "seed": self.seed, "index": self.index, "shape": list(self.shape),
                "sha1": self.sha1}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PatchBatch:
        return cls(recipe=d["recipe"], task=d["task"], n=int(d["n"]), seed=int(d["seed"]),
                   index=int(d["index"]), shape=(int(d["shape"][0]), int(d["shape"][1])),
                   sha1=str(d["sha1"]))  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class PositionTables:
    """Patching effects per position on one batch (normalised with that batch's baselines).

    Attributes:
        batch: the batch (:meth:`PatchBatch.batch` regenerates it).
        clean_logit_diff, corrupt_logit_diff: the batch's mean logit differences.
        head_denoise, head_noise: ``[layer, pos, head]`` (TransformerLens's
            ``get_act_patch_attn_head_out_by_pos`` layout).
        resid_pre_denoise, resid_pre_noise: ``[layer, pos]``.
        mlp_denoise, mlp_noise: ``[layer, pos]``; None for attention-only models.
    """

    batch: PatchBatch
    clean_logit_diff: float
    corrupt_logit_diff: float
    head_denoise: Array
    head_noise: Array
    resid_pre_denoise: Array
    resid_pre_noise: Array
    mlp_denoise: Array | None = None
    mlp_noise: Array | None = None

    _KEYS = (("head_denoise", "head_out_denoise"), ("head_noise", "head_out_noise"),
             ("resid_pre_denoise", "resid_pre_denoise"), ("resid_pre_noise", "resid_pre_noise"),
             ("mlp_denoise", "mlp_out_denoise"), ("mlp_noise", "mlp_out_noise"))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": self.batch.to_dict(),
                               "clean_logit_diff": self.clean_logit_diff,
                               "corrupt_logit_diff": self.corrupt_logit_diff}  # fmt: skip
        for attr, key in self._KEYS:
            if getattr(self, attr) is not None:
                out[key] = _lst(getattr(self, attr))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PositionTables:
        arrays = {attr: _arr(d[key]) for attr, key in cls._KEYS if d.get(key) is not None}
        return cls(batch=PatchBatch.from_dict(d["batch"]),
                   clean_logit_diff=float(d["clean_logit_diff"]),
                   corrupt_logit_diff=float(d["corrupt_logit_diff"]), **arrays)  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class RetrievalTruth:
    """Retrieval heads from ablation (rule in :data:`mechscope.models.zoo.truth.RETRIEVAL_RULE`).

    Attributes:
        heads: the retrieval heads.
        rule: the rule that picked them.
        baseline: accuracy without ablation.
        uniform_alone: ``[layer, head]`` accuracy with that head's attention uniform at the
            answer position (every other head intact).
        uniform_all_but: ``[layer, head]`` accuracy with every *other* head's attention uniform at
            the answer position (that head intact).
        uniform_all: accuracy with every head's attention uniform at the answer position.
        zero_alone: ``[layer, head]`` accuracy with that head's output zeroed at the answer position
            (reported, not used by the rule).
        local_heads, local_rule: the local (key-tagging) heads and their rule.
        heads_uniform: accuracy with the retrieval heads' attention uniform at every position.
        random_other_heads_uniform: the same for as many random other heads, several draws.
    """

    heads: tuple[tuple[int, int], ...]
    rule: str
    baseline: float
    uniform_alone: Array
    uniform_all_but: Array
    uniform_all: float
    zero_alone: Array
    local_heads: tuple[tuple[int, int], ...]
    local_rule: str
    heads_uniform: float | None
    random_other_heads_uniform: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"retrieval_heads": [list(h) for h in self.heads], "retrieval_rule": self.rule,
                "baseline_accuracy": self.baseline, "uniform_alone": _lst(self.uniform_alone),
                "uniform_all_but": _lst(self.uniform_all_but), "uniform_all": self.uniform_all,
                "zero_alone": _lst(self.zero_alone),
                "local_heads": [list(h) for h in self.local_heads], "local_rule": self.local_rule,
                "retrieval_heads_uniform": self.heads_uniform,
                "random_other_heads_uniform": list(self.random_other_heads_uniform)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetrievalTruth:
        return cls(heads=_heads(d["retrieval_heads"]), rule=d["retrieval_rule"],
                   baseline=float(d["baseline_accuracy"]), uniform_alone=_arr(d["uniform_alone"]),
                   uniform_all_but=_arr(d["uniform_all_but"]), uniform_all=float(d["uniform_all"]),
                   zero_alone=_arr(d["zero_alone"]), local_heads=_heads(d["local_heads"]),
                   local_rule=d["local_rule"], heads_uniform=d["retrieval_heads_uniform"],
                   random_other_heads_uniform=tuple(d["random_other_heads_uniform"]))  # fmt: skip

    def drop(self) -> Array:
        """``[layer, head]``: accuracy lost when the head's attention alone is made uniform."""
        return self.baseline - self.uniform_alone


def _heads(rows: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in rows)


def concordance(truth: Any, scores: Any, *, min_gap: float = 0.0) -> float:
    """Harrell's C: among pairs of items with different ``truth``, the fraction the ``scores``
    order the same way (a tie in the scores counts one half). With a boolean ``truth`` this is the
    ROC-AUC (Mann-Whitney). NaN when every item has the same truth. ``min_gap``: pairs whose
    truths differ by less are not compared (e.g. effects within the noise of a retrain).

    >>> concordance([0, 1, 2], [0.1, 0.5, 0.9]), concordance([0, 1, 2], [3, 2, 1])
    (1.0, 0.0)
    >>> concordance([False, True, True], [1.0, 1.0, 1.0])
    0.5
    """
    t = np.asarray(truth, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise InputError(f"truth has {t.size} items but scores have {s.size}")
    keep = ~(np.isnan(t) | np.isnan(s))
    t, s = t[keep], s[keep]
    pairs = t[:, None] - t[None, :] > min_gap if min_gap > 0 else t[:, None] > t[None, :]
    n = int(pairs.sum())
    if n == 0:
        return float("nan")
    diff = s[:, None] - s[None, :]
    return float(((diff > 0) & pairs).sum() + 0.5 * ((diff == 0) & pairs).sum()) / n


def recall_at_k(members: Any, scores: Any) -> float:
    """The expected fraction of ``members`` among the ``k = members.sum()`` top ``scores``, heads
    tied at the cut sharing the remaining places (so constant scores give ``k / n``).

    >>> recall_at_k([True, False, False, True], [0.9, 0.1, 0.2, 0.8])
    1.0
    >>> recall_at_k([True, False, False, False], [1.0, 1.0, 1.0, 1.0])
    0.25
    """
    m = np.asarray(members, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    k = int(m.sum())
    if k == 0:
        return float("nan")
    cut = np.sort(s)[::-1][k - 1]
    above, tied = s > cut, s == cut
    share = (k - int(above.sum())) / int(tied.sum())
    return float((m & above).sum() + share * (m & tied).sum()) / k


@dataclass(frozen=True, kw_only=True, eq=False)
class GroundTruth:
    """The measured ground truth of one zoo checkpoint (see the module docstring).

    Attributes:
        name, task: checkpoint and task family.
        accuracy, accuracy_by_batch, n_eval, eval_seed: top-1 accuracy on fresh prompts.
        head_scores: ``kind -> [layer, head]`` (previous_token, induction, copy, local, key_tag).
        metric, corruption: what the patching measured, and what the corrupt prompts change.
        batches: the patch batches the all-position tables average over.
        clean_logit_diff, corrupt_logit_diff: mean baselines over those batches.
        head_denoise, head_noise: ``[layer, head]`` per-head patching, all positions.
        mlp_denoise, mlp_noise: ``[layer]`` per-MLP patching, all positions (None: attn-only).
        by_position: per-position tables, one per batch they were computed on.
        circuit_heads, circuit_mlps, circuit_rule: the circuit (|effect| >= :data:`THRESHOLD`).
        head_norms: ``[layer, head]`` L2 norm of each head's parameters (0 = pruned).
        retrieval: the retrieval ablation (retrieval task only).
    """

    name: str
    task: str
    accuracy: float
    accuracy_by_batch: tuple[float, ...]
    n_eval: int
    eval_seed: int
    head_scores: Mapping[str, Array]
    metric: str
    corruption: str
    batches: tuple[PatchBatch, ...]
    clean_logit_diff: float
    corrupt_logit_diff: float
    head_denoise: Array
    head_noise: Array
    mlp_denoise: Array | None
    mlp_noise: Array | None
    by_position: tuple[PositionTables, ...]
    circuit_heads: tuple[tuple[int, int], ...]
    circuit_mlps: tuple[int, ...]
    circuit_rule: str
    head_norms: Array | None = None
    retrieval: RetrievalTruth | None = None
    notes: Mapping[str, str] = field(default_factory=dict)

    # -- derived -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.head_denoise.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.head_denoise.shape[1])

    def effect(self) -> Array:
        """``[layer, head]``: ``max(|denoise|, |noise|)``, the number the circuit rule thresholds."""
        return np.maximum(np.abs(self.head_denoise), np.abs(self.head_noise))

    def circuit_mask(self) -> Array:
        """``[layer, head]`` booleans: circuit membership."""
        mask = np.zeros((self.n_layers, self.n_heads), dtype=bool)
        for layer, head in self.circuit_heads:
            mask[layer, head] = True
        return mask

    def score_heads(self, scores: Any) -> dict[str, float]:
        """How well per-head ``scores [layer, head]`` (e.g. a detector's) match the truth.

        Returns:
            ``auc_circuit``: ROC-AUC of the scores against circuit membership (NaN when every
            head or none is in the circuit); ``concordance_effect``: the probability that two heads
            with different patching effects (:meth:`effect`) are ordered the same way by the
            scores (Harrell's C; ties in the scores count one half); ``recall_at_k``: the fraction
            of circuit heads among the ``k = len(circuit_heads)`` top-scoring heads
            (:func:`recall_at_k`). For retrieval also ``auc_retrieval`` (against the ablation's
            retrieval heads) and ``concordance_drop`` (against the accuracy each head's uniform
            ablation costs, :meth:`RetrievalTruth.drop`). 1 is perfect, 0.5 chance, 0 reversed.
        """
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (self.n_layers, self.n_heads):
            raise InputError(f"scores must be [layer, head] = {(self.n_layers, self.n_heads)}, "
                             f"got {s.shape}")  # fmt: skip
        mask = self.circuit_mask()
        out = {"auc_circuit": concordance(mask, s), "concordance_effect": concordance(self.effect(), s),
               "recall_at_k": recall_at_k(mask, s)}  # fmt: skip
        if self.retrieval is not None:
            ret = np.zeros_like(mask)
            for layer, head in self.retrieval.heads:
                ret[layer, head] = True
            out["auc_retrieval"] = concordance(ret, s)
            out["concordance_drop"] = concordance(self.retrieval.drop(), s)
        return out

    # -- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``ground_truth.json`` layout (format 2)."""
        patching: dict[str, Any] = {
            "metric": self.metric, "corruption": self.corruption,
            "batches": [b.to_dict() for b in self.batches],
            "clean_logit_diff": self.clean_logit_diff, "corrupt_logit_diff": self.corrupt_logit_diff,
            "head_out_denoise": _lst(self.head_denoise), "head_out_noise": _lst(self.head_noise),
        }  # fmt: skip
        if self.mlp_denoise is not None:
            patching["mlp_out_denoise"] = _lst(self.mlp_denoise)
            patching["mlp_out_noise"] = _lst(self.mlp_noise)
        patching["by_position"] = [t.to_dict() for t in self.by_position]
        out: dict[str, Any] = {
            "format": FORMAT, "name": self.name, "task": self.task, "n_eval": self.n_eval,
            "eval_seed": self.eval_seed, "accuracy": self.accuracy,
            "accuracy_by_batch": list(self.accuracy_by_batch),
            "head_scores": {k: _lst(v) for k, v in self.head_scores.items()},
            "patching": patching, "circuit_heads": [list(h) for h in self.circuit_heads],
            "circuit_mlps": list(self.circuit_mlps), "circuit_rule": self.circuit_rule,
            "head_norms": _lst(self.head_norms), "notes": dict(self.notes),
        }  # fmt: skip
        if self.retrieval is not None:
            out["retrieval"] = self.retrieval.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroundTruth:
        """Read the ``ground_truth.json`` layout; a clear error for another format."""
        if d.get("format") != FORMAT:
            raise WeightFileError(f"ground truth of format {d.get('format', 1)}; this mechscope "
                                  f"reads format {FORMAT}: regenerate it (mechscope zoo train)")
        p = d["patching"]
        mlp = p.get("mlp_out_denoise")
        norms = d.get("head_norms")
        return cls(
            name=d["name"], task=d["task"], accuracy=float(d["accuracy"]),
            accuracy_by_batch=tuple(float(a) for a in d["accuracy_by_batch"]),
            n_eval=int(d["n_eval"]), eval_seed=int(d["eval_seed"]),
            head_scores={k: _arr(v) for k, v in d["head_scores"].items()},
            metric=p["metric"], corruption=p["corruption"],
            batches=tuple(PatchBatch.from_dict(b) for b in p["batches"]),
            clean_logit_diff=float(p["clean_logit_diff"]),
            corrupt_logit_diff=float(p["corrupt_logit_diff"]),
            head_denoise=_arr(p["head_out_denoise"]), head_noise=_arr(p["head_out_noise"]),
            mlp_denoise=None if mlp is None else _arr(mlp),
            mlp_noise=None if mlp is None else _arr(p["mlp_out_noise"]),
            by_position=tuple(PositionTables.from_dict(t) for t in p["by_position"]),
            circuit_heads=_heads(d["circuit_heads"]),
            circuit_mlps=tuple(int(m) for m in d["circuit_mlps"]), circuit_rule=d["circuit_rule"],
            head_norms=None if norms is None else _arr(norms),
            retrieval=RetrievalTruth.from_dict(d["retrieval"]) if "retrieval" in d else None,
            notes=dict(d.get("notes", {})),
        )  # fmt: skip

    @classmethod
    def load(cls, where: str | Path) -> GroundTruth:
        """From a ``ground_truth.json``, a checkpoint folder, or a zoo name (``zoo:induction``)."""
        path = Path(where)
        if not path.exists():
            from mechscope.models.zoo import zoo_card

            path = zoo_card(str(where).removeprefix("zoo:")).directory
        if path.is_dir():
            path = path / "ground_truth.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightFileError(f"cannot read the ground truth {path}: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (one space of indent, as the shipped files)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


__all__ = ["FORMAT", "THRESHOLD", "GroundTruth", "PatchBatch", "PositionTables", "RetrievalTruth",
           "batch_checksum", "concordance", "recall_at_k"]  # fmt: skip
