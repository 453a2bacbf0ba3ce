"""The Result contract: what every analysis returns, and how it travels through the store.

An analysis is a function ``(model, inputs, config) -> Result``. A :class:`Result` is a frozen,
keyword-only dataclass holding the analysis's data and its :class:`Provenance` (which model, which
config and seed, which package versions, when). It shows itself as a table (:meth:`to_frame`) and
a figure (:meth:`figure`, drawn by :mod:`mechscope.figures`), and :meth:`save` writes it to a run
store as one run, from which :meth:`load` rebuilds an equal object.

Saving is generic over the dataclass fields: tensors and numpy arrays (also nested inside
containers) go to one safetensors file, every other field becomes a JSON result named after the
field, and the frame becomes the table ``frame``. What round-trips exactly: tensors (values, dtype
and shape; they come back on the CPU without ``requires_grad``), numpy arrays of numeric or bool
dtype, ``None``/bool/int/str, floats including NaN and infinities, lists, tuples (as tuples),
dicts (keys of any JSON-able type, tuples included; key order kept), :class:`pathlib.Path`, and
dataclasses defined at module level. Numpy scalars come back as Python scalars. Anything else is
refused by :meth:`save` with an :class:`~mechscope.errors.InputError`.

Subclasses are declared with ``@dataclass(frozen=True, kw_only=True, eq=False)``: ``eq=False``
keeps :meth:`Result.__eq__`, which compares tensors and arrays by value (see :meth:`equals`).
A class attribute ``kind`` names the run kind (the snake-cased class name by default).

>>> import tempfile
>>> from dataclasses import dataclass
>>> from mechscope.store import Store
>>> @dataclass(frozen=True, kw_only=True, eq=False)
... class Tally(Result):
...     kind = "tally"
...     counts: torch.Tensor
...     note: str
...     def to_frame(self):
...         return pd.DataFrame({"count": self.counts.tolist()})
...     def figure(self):
...         return go.Figure(go.Bar(y=self.counts.tolist()))
>>> tally = Tally(provenance=Provenance.of(None, {"n": 2}, seed=0),
...               counts=torch.tensor([3, 1]), note="two bins")
>>> store = Store(tempfile.mkdtemp())
>>> run_id = tally.save(store)
>>> store.get_run(run_id).kind, store.table(run_id, "frame")["count"].tolist()
('tally', [3, 1])
>>> Tally.load(store, run_id) == tally
True
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError, StoreError
from mechscope.figures import layer_head_heatmap, token_layer_heatmap
from mechscope.models.loading import fingerprint, spec_of
from mechscope.store import RunWriter, Store
from mechscope.store.jsonsafe import package_versions
from mechscope.types import Model

#: Bumped whenever the stored layout of a Result changes; :meth:`Result.load` refuses others.
FORMAT_VERSION = 1
_RESERVED = frozenset({"result", "provenance", "frame", "tensors"})
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _config_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic | Tensor) and value.ndim == 0:
        return value.item()
    raise InputError(f"config values must be JSON-able; got a {type(value).__name__}: {value!r}")


def plain_config(config: Any) -> dict[str, Any]:
    """A config (dataclass, mapping or None) as the plain JSON dict the store keeps.

    Tuples become lists and keys strings, exactly as after a trip through the store.

    >>> plain_config({"layers": (0, 1), "lr": 0.1})
    {'layers': [0, 1], 'lr': 0.1}
    """
    if config is None:
        return {}
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    if not isinstance(config, Mapping):
        raise InputError(f"a config is a dataclass or a mapping, not a {type(config).__name__}")
    try:
        text = json.dumps(dict(config), allow_nan=False, default=_config_default)
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"config values must be finite numbers: {exc}") from exc
    return cast(dict[str, Any], json.loads(text))


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where a result came from.

    Attributes:
        model_spec: the spec the model was loaded from (None for a model built by hand).
        model_fingerprint: :func:`mechscope.models.loading.fingerprint` of its weights.
        config: the analysis config as plain JSON (see :func:`plain_config`).
        seed: the seed the analysis used.
        versions: :func:`mechscope.store.db.package_versions` when the result was made.
        created: when the result was made (seconds since the epoch).
    """

    model_spec: str | None
    model_fingerprint: str | None
    config: dict[str, Any]
    seed: int | None
    versions: dict[str, str]
    created: float

    @classmethod
    def of(cls, model: Model | None, config: Any = None, seed: int | None = None) -> Provenance:
        """The provenance of a result computed now from ``model`` with ``config`` and ``seed``.

        >>> Provenance.of(None, {"k": 3}, seed=1).config
        {'k': 3}
        """
        return cls(
            model_spec=spec_of(model) if model is not None else None,
            model_fingerprint=fingerprint(model) if model is not None else None,
            config=plain_config(config), seed=seed, versions=package_versions(),
            created=time.time(),
        )  # fmt: skip


# -- encoding fields as JSON + tensors ---------------------------------------------------------


def class_name(cls: type) -> str:
    """``module:qualname``, the name a saved result records for its class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise StoreError(f"cannot import the stored class {name}: {exc}") from exc
    if not isinstance(obj, type):
        raise StoreError(f"the stored class {name} is not a class")
    return obj


def _encode(value: Any, where: str, tensors: dict[str, Tensor], key: str | None = None) -> Any:
    """``value`` as plain JSON; tensors and arrays go into ``tensors`` under ``key`` (or a
    numbered key below ``where``) and leave a marker behind."""

    def sub(v: Any, at: str) -> Any:
        return _encode(v, at, tensors)

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.generic):
        return sub(value.item(), where)
    if isinstance(value, Tensor | np.ndarray):
        name = key or f"{where.split('.')[0]}#{len(tensors)}"
        if isinstance(value, Tensor):
            tensors[name] = value.detach().cpu().clone()
            return {"__tensor__": name}
        if value.dtype.kind not in "biuf":
            raise InputError(f"{where} is a numpy array of dtype {value.dtype}; only numeric and "
                             "bool arrays can be stored")  # fmt: skip
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value)).clone()
        return {"__ndarray__": name}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [sub(v, f"{where}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [sub(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: sub(v, f"{where}.{k}") for k, v in value.items()}
        return {"__dict__": [[sub(k, f"{where}.key"), sub(v, f"{where}.{i}")]
                             for i, (k, v) in enumerate(value.items())]}  # fmt: skip
    if is_dataclass(value) and not isinstance(value, type):
        name = class_name(type(value))
        if "<locals>" in name:
            raise InputError(f"{where} is a {name}, defined inside a function; only module-level "
                             "dataclasses can be loaded back")  # fmt: skip
        kept = {f.name: sub(getattr(value, f.name), f"{where}.{f.name}")
                for f in fields(value) if f.init}  # fmt: skip
        return {"__dataclass__": name, "fields": kept}
    raise InputError(
        f"{where} holds a {type(value).__name__}, which a Result cannot store; use tensors, "
        "numpy arrays, numbers, strings, lists, tuples, dicts or dataclasses"
    )


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if not any(k.startswith("__") for k in value):
        return {k: _decode(v, tensors) for k, v in value.items()}
    if "__tensor__" in value or "__ndarray__" in value:
        name = str(value.get("__tensor__", value.get("__ndarray__")))
        if name not in tensors:
            raise StoreError(f"the stored tensor {name!r} is missing from the run's tensor file")
        return tensors[name] if "__tensor__" in value else tensors[name].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__path__" in value:
        return Path(value["__path__"])
    if "__dict__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    if "__dataclass__" in value:
        cls = _import_class(value["__dataclass__"])
        if not is_dataclass(cls):
            raise StoreError(f"the stored class {value['__dataclass__']} is not a dataclass")
        return cls(**{k: _decode(v, tensors) for k, v in value["fields"].items()})
    raise StoreError(f"unknown stored marker in {sorted(value)}; was it saved by a newer mechscope?")


def same(a: Any, b: Any) -> bool:
    """Deep equality that compares tensors and arrays by dtype, shape and value (NaN equal to
    NaN), and tells tuples from lists.

    >>> same({"x": (torch.tensor([1.0, float("nan")]),)}, {"x": (torch.tensor([1.0, float("nan")]),)})
    True
    >>> same((1, 2), [1, 2])
    False
    """
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        equal = a == b
        if a.is_floating_point() or a.is_complex():
            equal |= a.isnan() & b.isnan()
        return bool(equal.all())
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if is_dataclass(a) and not isinstance(a, type):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    return bool(a == b)


# -- the base class ----------------------------------------------------------------------------

R = TypeVar("R", bound="Result")


@dataclass(frozen=True, kw_only=True, eq=False)
class Result(ABC):
    """The base of every analysis result; see the module docstring for the contract.

    Attributes:
        provenance: where the result came from.
    """

    kind: ClassVar[str] = "result"
    provenance: Provenance

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            cls.kind = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def __post_init__(self) -> None:
        if type(self).__eq__ is not Result.__eq__:
            raise TypeError(f"declare {type(self).__name__} with @dataclass(frozen=True, "
                            "kw_only=True, eq=False) so that == compares tensors by value")

    @abstractmethod
    def to_frame(self) -> pd.DataFrame:
        """The result as a tidy table (one row per measured thing)."""

    @abstractmethod
    def figure(self) -> go.Figure:
        """The result's standard figure (drawn with :mod:`mechscope.figures`)."""

    def equals(self, other: object) -> bool:
        """Same class and every field equal, tensors and arrays by value (see :func:`same`)."""
        return type(other) is type(self) and all(
            same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
        )

    def __eq__(self, other: object) -> bool:
        return self.equals(other)

    def save(self, store: Store) -> str:
        """Write the result as one run of kind :attr:`kind`; return the run id.

        The run records the provenance's config, seed, model spec and fingerprint; its results
        are ``result`` (class and format), ``provenance``, the ``frame`` table, one JSON result
        per field and, when any field holds tensors or arrays, the tensors result ``tensors``.

        Raises:
            InputError: a field value that cannot be stored, or a field named like one of the
                reserved results (``result``, ``provenance``, ``frame``, ``tensors``).
        """
        payloads, tensors, meta = self._encoded()
        prov = self.provenance
        with store.run(self.kind, config=prov.config, model_spec=prov.model_spec, seed=prov.seed,
                       model_fingerprint=prov.model_fingerprint) as run:
            self._stage(run, "", payloads, tensors, meta)
        return run.id

    def stage(self, run: RunWriter, name: str) -> None:
        """Stage the result inside a run that holds several (a demo, a ``discover`` pipeline).

        Stored as :meth:`save` stores it, every result name prefixed by ``name.`` (``name.result``,
        ``name.provenance``, ``name.frame``, one JSON result per field, ``name.tensors``);
        :meth:`load` with ``name=`` rebuilds it and :func:`stored_results` lists a run's results.
        Like everything staged, it becomes visible only when the run's block ends without error.

        Raises:
            InputError: a name that is empty or holds ``.`` or ``/``, a name already used in
                this run, or a field that cannot be stored (see :meth:`save`).
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(f"a staged result's name is letters, digits, '_' and '-', not "
                             f"{name!r}")  # fmt: skip
        payloads, tensors, meta = self._encoded()
        self._stage(run, f"{name}.", payloads, tensors, meta)

    def _encoded(self) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        payloads: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "provenance" or not f.init:
                continue
            if f.name in _RESERVED:
                raise InputError(f"{type(self).__name__} has a field named {f.name!r}; rename it "
                                 f"(reserved: {sorted(_RESERVED)})")  # fmt: skip
            payloads[f.name] = _encode(getattr(self, f.name), f.name, tensors, key=f.name)
        meta = {"class": class_name(type(self)), "format": FORMAT_VERSION,
                "fields": list(payloads)}  # fmt: skip
        return payloads, tensors, meta

    def _stage(self, run: RunWriter, prefix: str, payloads: dict[str, Any],
               tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:  # fmt: skip
        frame = self.to_frame()
        run.add_json(f"{prefix}result", meta)
        run.add_json(f"{prefix}provenance", asdict(self.provenance))
        run.add_table(f"{prefix}frame", frame)
        for field_name, payload in payloads.items():
            run.add_json(f"{prefix}{field_name}", payload)
        if tensors:
            run.add_tensors(f"{prefix}tensors", tensors)

    @classmethod
    def load(cls: type[R], store: Store, run_id: str, name: str | None = None) -> R:
        """Rebuild the result saved as run ``run_id`` (a unique prefix is enough), or, with
        ``name``, the one staged in that run under ``name`` (:meth:`stage`).

        ``Result.load`` itself loads whatever result class the run holds (importing it);
        a subclass loads only its own runs. Only reads, so a read-only store works.

        Raises:
            StoreError: no such run, a run that is not complete, a run (or name) not saved by
                :meth:`save` (:meth:`stage`), a run of another class or result format, or
                stored fields that no longer match the class.
        """
        rec = store.get_run(run_id)
        if rec.status != "complete":
            why = f" ({rec.error})" if rec.error else ""
            raise StoreError(f"run {rec.id} is {rec.status}{why}; only a complete run can be "
                             "loaded as a result")  # fmt: skip
        prefix = "" if name is None else f"{name}."
        names = store.result_names(rec.id)
        if names.get(f"{prefix}result") != "json" or names.get(f"{prefix}provenance") != "json":
            if name is not None:
                have = sorted(stored_results(store, rec.id))
                raise StoreError(f"run {rec.id} (kind {rec.kind!r}) holds no result named "
                                 f"{name!r}; it holds {have}")  # fmt: skip
            raise StoreError(f"run {rec.id} (kind {rec.kind!r}) was not saved by Result.save; "
                             f"it holds {names}")  # fmt: skip
        meta = store.json(rec.id, f"{prefix}result")
        where = f"run {rec.id}" + ("" if name is None else f" (result {name!r})")
        if meta.get("format") != FORMAT_VERSION:
            raise StoreError(f"{where} was saved in result format {meta.get('format')}; "
                             f"this mechscope reads format {FORMAT_VERSION}")  # fmt: skip
        stored = str(meta["class"])
        target: type[Result] = cls
        if cls is Result:
            found = _import_class(stored)
            if not issubclass(found, Result):
                raise StoreError(f"the stored class {stored} is not a Result")
            target = found
        elif stored != class_name(cls):
            raise StoreError(f"{where} holds a {stored}, not a {class_name(cls)}; load it "
                             "with that class, or with Result.load")  # fmt: skip
        tensors = (store.tensors(rec.id, f"{prefix}tensors")
                   if names.get(f"{prefix}tensors") == "tensors" else {})  # fmt: skip
        try:
            prov = Provenance(**store.json(rec.id, f"{prefix}provenance"))
            kwargs = {n: _decode(store.json(rec.id, f"{prefix}{n}"), tensors)
                      for n in meta["fields"]}  # fmt: skip
            return cast(R, target(provenance=prov, **kwargs))
        except TypeError as exc:
            raise StoreError(f"{where} does not match {class_name(target)} as it is now: "
                             f"{exc}") from exc  # fmt: skip


def stored_results(store: Store, run_id: str) -> dict[str, str]:
    """The :class:`Result` objects a complete run holds: ``name -> stored class``
    (``module:Class``), sorted by name.

    The name is ``""`` for a run written by :meth:`Result.save`, else the name given to
    :meth:`Result.stage`. Load each with ``Result.load(store, run_id, name or None)``.
    Reads only the small ``result`` records, never tensors.
    """
    rec = store.get_run(run_id)
    if rec.status != "complete":
        return {}
    found: dict[str, str] = {}
    for key, kind in store.result_names(rec.id).items():
        if kind != "json" or not (key == "result" or key.endswith(".result")):
            continue
        name = "" if key == "result" else key[: -len(".result")]
        if "." in name:
            continue
        meta = store.json(rec.id, key)
        if isinstance(meta, dict) and "class" in meta and "format" in meta:
            found[name] = str(meta["class"])
    return found


# -- reusable results --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadScores(Result):
    """One score per attention head (induction score, patching effect, retrieval score, ...).

    Attributes:
        scores: the score of every head.
        metric: what the score measures (the figure's title).
        labels: optional names of some heads, ``(layer, head) -> label``.

    >>> hs = HeadScores(provenance=Provenance.of(None), metric="copy score",
    ...                 scores=torch.tensor([[0.25, 0.75], [0.5, -1.0]]))
    >>> hs.top(2)
    [(0, 1, 0.75), (1, 0, 0.5)]
    >>> hs.top(1, by_abs=True)
    [(1, 1, -1.0)]
    >>> hs.to_frame().columns.tolist()
    ['layer', 'head', 'score']
    """

    kind = "head_scores"
    scores: Float[Tensor, "layer head"]
    metric: str
    labels: dict[tuple[int, int], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scores.ndim != 2:
            raise InputError(f"scores must be [layer, head], got shape {tuple(self.scores.shape)}")
        n_layers, n_heads = self.scores.shape
        for layer, head in self.labels:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise InputError(f"label for L{layer}H{head} is outside the {n_layers} x "
                                 f"{n_heads} heads")  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, head, score`` (and ``label`` when any head is labelled)."""
        n_layers, n_heads = self.scores.shape
        frame = pd.DataFrame({
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "score": self.scores.detach().to("cpu", torch.float64).reshape(-1).numpy(),
        })  # fmt: skip
        if self.labels:
            frame["label"] = [self.labels.get((int(r.layer), int(r.head)), "")
                              for r in frame.itertuples()]  # fmt: skip
        return frame

    def figure(self) -> go.Figure:
        """A layer x head heatmap (diverging around 0 when any score is negative)."""
        signed = bool((self.scores < 0).any())
        return layer_head_heatmap(self.scores, title=self.metric, zmid=0.0 if signed else None,
                                  colorscale="RdBu" if signed else "Viridis")  # fmt: skip

    def top(self, k: int = 10, *, by_abs: bool = False) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``, best first (NaN never;
        ``by_abs`` ranks by ``|score|``, for signed effects). Ties keep layer-major order."""
        if k < 0:
            raise InputError(f"k must be >= 0, got {k}")
        flat = self.scores.detach().to("cpu", torch.float64).reshape(-1)
        key = flat.abs() if by_abs else flat
        order = torch.sort(key, descending=True, stable=True).indices
        n_heads = self.scores.shape[1]
        best = [int(i) for i in order if not math.isnan(float(flat[i]))][:k]
        return [(i // n_heads, i % n_heads, float(flat[i])) for i in best]


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerPositionScores(Result):
    """One score per (layer, position) of a prompt, e.g. causal tracing's restored probability.

    Attributes:
        scores: the score at every layer and position.
        tokens: the prompt's tokens, one per position (stored as a tuple).
        metric: what the score measures (the figure's title).
    """

    kind = "layer_position_scores"
    scores: Float[Tensor, "layer pos"]
    tokens: Sequence[str]
    metric: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tokens, str):
            raise InputError("tokens must be a sequence of strings, one per position, not a str")
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.scores.ndim != 2:
            raise InputError(f"scores must be [layer, pos], got shape {tuple(self.scores.shape)}")
        if len(self.tokens) != self.scores.shape[1]:
            raise InputError(f"tokens has {len(self.tokens)} entries but scores has "
                             f"{self.scores.shape[1]} positions")  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, pos, token, score``."""
        n_layers, n_pos = self.scores.shape
        return pd.DataFrame({
            "layer": np.repeat(np.arange(n_layers), n_pos),
            "pos": np.tile(np.arange(n_pos), n_layers),
            "token": list(self.tokens) * n_layers,
            "score": self.scores.detach().to("cpu", torch.float64).reshape(-1).numpy(),
        })  # fmt: skip

    def figure(self) -> go.Figure:
        """A tokens x layers heatmap."""
        return token_layer_heatmap(self.scores, list(self.tokens), title=self.metric)


__all__ = [
    "FORMAT_VERSION",
    "HeadScores",
    "LayerPositionScores",
    "Provenance",
    "Result",
    "class_name",
    "plain_config",
    "same",
    "stored_results",
]
