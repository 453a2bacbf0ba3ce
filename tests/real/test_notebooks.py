"""The notebooks in ``notebooks/``: stored clean, public API only, and they run top to bottom.

Each notebook is executed in a fresh Jupyter kernel (nbclient, the ``python3`` kernel of this
environment's ipykernel), in a temporary working directory, against the real models (SmolLM2 and
the zoo); every notebook asserts its own findings (" Paris" is the top prediction, the zoo's
circuit heads are found, ...), so a notebook that runs is a notebook whose claims hold.

The static checks: valid nbformat 4, no outputs or execution counts stored (outputs belong to
whoever runs them, not to git), imports from ``mechscope`` only of public names (in the module's
``__all__``, or a public submodule), and no ``def``/``class`` (library code belongs in the package).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_quickstart.ipynb", "02_causal_tracing.ipynb", "03_head_analyses.ipynb",
            "04_circuit_discovery.ipynb"}  # fmt: skip


def _code(nb) -> list[tuple[int, ast.Module]]:
    return [(i, ast.parse(cell.source, filename=f"cell {i}"))
            for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]  # fmt: skip


def _public(module: str, name: str | None) -> bool:
    if any(part.startswith("_") for part in module.split(".")):
        return False
    if name is None:
        return True
    if name.startswith("_"):
        return False
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    if exported is not None and name in exported:
        return True
    return importlib.util.find_spec(f"{module}.{name}") is not None  # a public submodule


def test_the_notebooks_are_there() -> None:
    assert {p.name for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.cells[0].cell_type == "markdown", "a notebook opens by saying what it does"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.execution_count is None and cell.outputs == [], f"cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_the_public_api_only(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    bad = []
    for i, tree in _code(nb):
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bad.append(f"cell {i}: defines {node.name} (library code belongs in the package)")
            elif isinstance(node, ast.Import):
                bad += [f"cell {i}: import {a.name}" for a in node.names
                        if a.name.startswith("mechscope") and not _public(a.name, None)]  # fmt: skip
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mechscope"):
                assert node.module is not None
                bad += [f"cell {i}: from {node.module} import {a.name}" for a in node.names
                        if not _public(node.module, a.name)]  # fmt: skip
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not (
                node.attr.startswith("__") and node.attr.endswith("__")
            ):
                bad.append(f"cell {i}: private attribute .{node.attr}")
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path) -> None:
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    # First, in the executed copy only: the kernel must be this environment's Python.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    prefix = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert prefix == sys.prefix, f"the kernel ran {prefix}, not this environment ({sys.prefix})"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
