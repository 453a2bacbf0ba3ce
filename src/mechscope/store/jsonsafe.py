"""JSON for the run store: plain, strictly finite values from numpy, torch, dataclasses, paths.

Every JSON payload (configs, JSON results, table cells) goes through :func:`_jsonable`, which turns
numpy/torch values into plain Python values and refuses NaN/inf with an :class:`InputError` naming
the result and the path of the value (table cells map NaN to ``None``, a missing cell).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import PurePath
from typing import Any

import torch

from mechscope.errors import InputError


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on (read once per process)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("mechscope", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


_FIX = "replace it with None or a finite number"


def _bad_float(value: float, where: str, path: str, nan_to_none: bool) -> None:
    """``None`` for a NaN that may become ``None``; raise :class:`InputError` otherwise."""
    if math.isnan(value) and nan_to_none:
        return None
    bad = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    raise InputError(f"{where} has {bad} at {path or 'the top level'}; {_FIX}")


def _json_key(key: Any, where: str, path: str) -> str:
    """A mapping key as JSON writes it (``json.dumps`` turns ``1`` into ``"1"``, ...)."""
    if isinstance(key, str):
        return key
    plain = _jsonable(key, where, path)
    if isinstance(plain, str):
        return plain
    if plain is None or isinstance(plain, bool | int | float):
        return json.dumps(plain)
    return str(plain)


def _jsonable(value: Any, where: str, path: str = "", *, nan_to_none: bool = False) -> Any:
    """``value`` as plain JSON data (dict/list/str/int/float/bool/None), checked to be finite.

    Converts numpy arrays and scalars, torch tensors, dataclass instances, paths, tuples and sets
    (recursively); anything else becomes ``str(value)``. A NaN or +-inf anywhere raises
    :class:`InputError` naming ``where`` and the path of the value (``['scores'][3]``), except that
    with ``nan_to_none`` a NaN becomes ``None`` (tables: NaN is a missing cell; inf stays an
    error). pandas' ``NA``/``NaT`` become ``None``.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else _bad_float(value, where, path, nan_to_none)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()):
            return t.tolist()
        if t.is_floating_point() and bool(torch.isfinite(t).all()):
            return t.tolist()
        return _jsonable(t.tolist(), where, path, nan_to_none=nan_to_none)  # slow path: find it
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biu":
                return value.tolist()
            if value.dtype.kind == "f" and bool(np.isfinite(value).all()):
                return value.tolist()
            return _jsonable(value.tolist(), where, path, nan_to_none=nan_to_none)
        if isinstance(value, np.generic):
            return _jsonable(value.item(), where, path, nan_to_none=nan_to_none)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            k = _json_key(key, where, path)
            out[k] = _jsonable(item, where, f"{path}[{k!r}]", nan_to_none=nan_to_none)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        if isinstance(value, set | frozenset):
            with suppress(TypeError):  # sorted when the items can be ordered
                items = sorted(items)
        return [_jsonable(v, where, f"{path}[{i}]", nan_to_none=nan_to_none)
                for i, v in enumerate(items)]
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name), where, f"{path}[{f.name!r}]",
                                  nan_to_none=nan_to_none)
                for f in dataclasses.fields(value)}
    pd = sys.modules.get("pandas")
    if pd is not None and (value is pd.NA or value is pd.NaT):
        return None
    for method in ("item", "tolist"):  # other array libraries' scalars and arrays
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                plain = convert()
            except (TypeError, ValueError):
                continue
            if plain is not value:
                return _jsonable(plain, where, path, nan_to_none=nan_to_none)
    return str(value)


def _dumps(value: Any) -> str:
    """JSON text of already plain data; never writes ``NaN``/``Infinity`` (invalid JSON)."""
    return json.dumps(value, allow_nan=False)


def _table_payload(name: str, data: Any) -> dict[str, Any]:
    """Records + columns from a DataFrame, a list of dicts, or a dict of columns.

    Cells go through :func:`_jsonable`: NaN (and pandas' NA/NaT) become ``None`` (a missing
    cell), while +-inf is an :class:`InputError` naming the row and column, since ``None`` would
    silently turn "infinitely large" into "missing".
    """
    if hasattr(data, "to_dict") and hasattr(data, "columns"):
        columns = [str(c) for c in data.columns]
        records = data.to_dict("records")
    elif isinstance(data, Mapping):
        columns = [str(c) for c in data]
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise InputError(f"table columns have different lengths: {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        records = [{c: data[c][i] for c in data} for i in range(n)]
    elif isinstance(data, Sequence):
        records = [dict(r) for r in data]
        columns = list(dict.fromkeys(k for r in records for k in r))
    else:
        raise InputError(f"a table is a DataFrame, a list of dicts or a dict of columns, not {type(data).__name__}")
    where = f"table {name!r}"
    records = [{str(key): _jsonable(value, where, f"[{i}][{str(key)!r}]", nan_to_none=True)
                for key, value in rec.items()} for i, rec in enumerate(records)]
    return {"columns": columns, "records": records}
