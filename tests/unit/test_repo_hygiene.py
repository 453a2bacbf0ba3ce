"""Contracts of the code base itself: small modules, hooks registered in one module only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "mechscope"
HOOK_CALLS = re.compile(
    r"\.(hooks|add_hook|add_perma_hook|run_with_hooks|run_with_cache|register_forward_hook|"
    r"register_forward_pre_hook|register_full_backward_hook|register_backward_hook)\("
    r"|\bpatching\.\w+\("
    r"|from\s+transformer_lens(\.\w+)*\s+import\s+.*\bpatching\b"
    r"|import\s+transformer_lens\.patching|from\s+transformer_lens\.patching\s+import"
)


def test_no_module_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"


def test_hooks_are_registered_in_one_module_only():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path == SRC / "probes" / "hooks.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if HOOK_CALLS.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not offenders, "hooks and TransformerLens patching/run_with_cache go through mechscope.probes (hooked, intervene, Tracer):\n" + "\n".join(offenders)


@pytest.mark.parametrize("line", [
    "logits, cache = model.run_with_cache(tokens)",
    "out = model.run_with_hooks(tokens, fwd_hooks=hooks)",
    "model.add_hook('blocks.0.hook_z', fn)",
    "with model.hooks(fwd_hooks=hooks):",
    "from transformer_lens import patching",
    "from transformer_lens import HookedTransformer, patching",
    "import transformer_lens.patching as tlp",
    "from transformer_lens.patching import get_act_patch_resid_pre",
    "table = patching.get_act_patch_attn_head_out_all_pos(model, x, cache, fn)",
    "h = module.register_forward_hook(fn)",
])
def test_the_hook_pattern_catches_every_way_to_attach_a_hook(line):
    assert HOOK_CALLS.search(line), line


@pytest.mark.parametrize("line", [
    "the zoo's ground truth uses TransformerLens ``patching`` as an oracle in tests",
    "with hooked(model, hooks):",
    "with intervene(model, specs):",
])
def test_the_hook_pattern_leaves_prose_and_the_one_api_alone(line):
    assert not HOOK_CALLS.search(line), line


def test_no_print_in_the_library():
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.match(r"\s*print\(", line)]
    assert not offenders, offenders


def test_ruff_and_mypy_are_clean():
    """The linters of pyproject.toml pass over the package, tests and benchmarks."""
    import shutil
    import subprocess

    root = SRC.parents[1]
    for tool, args in (("ruff", ["check", "src", "tests", "benchmarks"]), ("mypy", [])):
        exe = shutil.which(tool)
        assert exe, f"{tool} is not installed: pip install -e '.[test]'"
        proc = subprocess.run([exe, *args], cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, f"{tool} found problems:\n{proc.stdout[-3000:]}{proc.stderr[-1000:]}"
