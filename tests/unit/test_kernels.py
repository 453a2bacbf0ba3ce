"""The batched-patching kernels: references against hand-written loops, Triton (run by its
interpreter on the CPU) against the references over odd shapes and dtypes, dispatch and input
checks. The references are imported from the package, as the benchmarks import them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jaxtyping import TypeCheckError

from mechscope.errors import InputError
from mechscope.kernels import _dispatch, add_subject_noise, scatter_patches, subject_noise
from mechscope.kernels.noise import check as check_noise
from mechscope.kernels.noise import reference as noise_ref
from mechscope.kernels.patch_scatter import check as check_scatter
from mechscope.kernels.patch_scatter import reference as scatter_ref

ROOT = Path(__file__).resolve().parents[2]
BAD_INPUT = (InputError, TypeCheckError)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch):
    """Run Triton kernels with the interpreter on CPU tensors (read when a kernel is jitted)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from mechscope.kernels.noise import triton as noise_tri
    from mechscope.kernels.patch_scatter import triton as scatter_tri

    return scatter_tri, noise_tri


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scatter_case(shape: tuple[int, ...], dtype: torch.dtype, seed: int, with_all: bool):
    """Random variants/clean and indices; per-head when ``shape`` has 5 axes."""
    g = _gen(seed)
    n_var, _, n_pos = shape[:3]
    variants = torch.randn(shape, generator=g).to(dtype)
    clean = torch.randn(shape[1:], generator=g).to(dtype)
    positions = torch.randint(0, n_pos, (n_var,), generator=g)
    heads = torch.randint(0, shape[3], (n_var,), generator=g) if len(shape) == 5 else None
    if with_all:
        positions[0] = -1
        if heads is not None and n_var > 1:
            heads[1] = -1
    return variants, clean, positions, heads


def _scatter_loop(variants, clean, positions, heads):
    """The definition, one (variant, batch row, position, head) at a time."""
    out = variants.clone()
    n_var, n_batch, n_pos = variants.shape[:3]
    for v in range(n_var):
        p = int(positions[v])
        ts = range(n_pos) if p == -1 else [p]
        for b in range(n_batch):
            for t in ts:
                if heads is None:
                    out[v, b, t] = clean[b, t]
                    continue
                h = int(heads[v])
                for hh in range(variants.shape[3]) if h == -1 else [h]:
                    out[v, b, t, hh] = clean[b, t, hh]
    return out


@pytest.mark.parametrize("shape", [(3, 2, 5, 4), (4, 2, 3, 2, 5)])
@pytest.mark.parametrize("with_all", [False, True])
def test_scatter_reference_matches_loop(shape, with_all) -> None:
    variants, clean, positions, heads = _scatter_case(shape, torch.float32, 0, with_all)
    expected = _scatter_loop(variants, clean, positions, heads)
    out = scatter_ref.scatter_patches(variants, clean, positions, heads)
    assert out is variants  # in place
    assert torch.equal(out, expected)


def test_scatter_public_is_in_place_and_touches_nothing_else() -> None:
    variants, clean, positions, _ = _scatter_case((5, 3, 7, 6), torch.float32, 1, False)
    before = variants.clone()
    out = scatter_patches(variants, clean, positions)
    assert out is variants
    touched = torch.zeros(variants.shape[:3], dtype=torch.bool)
    touched[torch.arange(5), :, positions] = True
    assert torch.equal(out[~touched], before[~touched])
    assert torch.equal(out[touched], clean.unsqueeze(0).expand_as(out)[touched])


SCATTER_SHAPES = [(3, 17, 5, 13), (5, 3, 7, 1), (1, 1, 1, 1), (3, 17, 5, 3, 13), (7, 2, 3, 5, 9)]


@pytest.mark.parametrize("shape", SCATTER_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_triton_equals_reference_exactly(interpret, shape, dtype) -> None:
    scatter_tri, _ = interpret
    variants, clean, positions, heads = _scatter_case(shape, dtype, 2, with_all=len(shape) == 5)
    expected = scatter_ref.scatter_patches(variants.clone(), clean, positions, heads)
    out = scatter_tri.scatter_patches(variants, clean, positions, heads)
    assert out is variants
    assert torch.equal(out.view(INT_VIEW[dtype]), expected.view(INT_VIEW[dtype]))  # a copy: 0 ulp


def test_scatter_triton_strided_buffers_and_all_positions(interpret) -> None:
    scatter_tri, _ = interpret
    g = _gen(3)
    base = torch.randn(4, 3, 5, 13, generator=g)  # [batch, variant, pos, d_model] storage
    variants = base.transpose(0, 1)  # [variant, batch, pos, d_model], not contiguous
    clean = torch.randn(5, 4, 13, generator=g).transpose(0, 1)  # [batch, pos, d_model] strided
    positions = torch.tensor([-1, 4, 0], dtype=torch.int32)
    expected = _scatter_loop(variants, clean, positions, None)
    scatter_tri.scatter_patches(variants, clean, positions)
    assert torch.equal(variants, expected)


def _noise_loop(embeds, noise, mask, scale):
    """The definition, one (row, position) at a time; ROME's rank rule for short noise."""
    out = embeds.clone()
    n_batch, n_pos, _ = embeds.shape
    mask = mask.expand(n_batch, n_pos)
    for b in range(n_batch):
        k = 0
        for t in range(n_pos):
            if mask[b, t]:
                z = noise[b, t] if noise.shape[1] == n_pos else noise[b, k]
                out[b, t] = (embeds[b, t].float() + scale * z.float()).to(embeds.dtype)
                k += 1
    return out


def _noise_case(shape, dtype, seed, short: bool, per_row: bool):
    n_batch, n_pos, d = shape
    g = _gen(seed)
    embeds = torch.randn(shape, generator=g).to(dtype)
    if per_row:
        mask = torch.zeros(n_batch, n_pos, dtype=torch.bool)
        for b in range(n_batch):  # a 2-token subject span at a different place in every row
            start = b % max(n_pos - 1, 1)
            mask[b, start : start + 2] = True
    else:
        mask = torch.zeros(n_pos, dtype=torch.bool)
        mask[1 : n_pos - 1 : 2] = True
    n_subj = int(mask.expand(n_batch, n_pos).sum(dim=1)[0]) if short else n_pos
    noise = subject_noise(n_batch, n_subj, d, seed=seed)
    return embeds, noise, mask


@pytest.mark.parametrize("short", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_noise_reference_matches_loop(short, per_row) -> None:
    embeds, noise, mask = _noise_case((3, 6, 4), torch.float32, 4, short, per_row)
    expected = _noise_loop(embeds, noise, mask, 3.0)
    out = add_subject_noise(embeds, noise, mask, 3.0)
    assert torch.equal(out, expected)
    assert out.data_ptr() != embeds.data_ptr()  # out of place


NOISE_SHAPES = [(3, 17, 13), (5, 7, 1), (1, 3, 33), (10, 5, 16)]


@pytest.mark.parametrize("shape", NOISE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("short", [False, True])
def test_noise_triton_matches_reference(interpret, shape, dtype, short) -> None:
    _, noise_tri = interpret
    embeds, noise, mask = _noise_case(shape, dtype, 5, short, per_row=shape[1] > 2)
    embeds[0, 0, 0] = -0.0  # position 0 is outside every mask: -0.0 must survive
    mask2 = mask.expand(shape[0], shape[1])
    slots = noise_ref.slots_from_mask(mask2, noise.shape[1])
    expected = noise_ref.add_subject_noise(embeds, noise, slots, 3.0)
    out = noise_tri.add_subject_noise(embeds, noise, slots, 3.0)
    torch.testing.assert_close(out, expected)  # per-dtype tolerance (an FMA may round once less)
    iv = INT_VIEW[dtype]
    assert torch.equal(out[~mask2].view(iv), embeds[~mask2].view(iv))  # untouched, bit for bit
    zero = noise_tri.add_subject_noise(embeds, noise, slots, 0.0)
    assert torch.equal(zero.view(iv), embeds.view(iv))  # scale 0 is the identity, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_reference_scale_zero_and_unmasked_bit_exact(dtype) -> None:
    embeds, noise, mask = _noise_case((4, 9, 5), dtype, 6, short=False, per_row=True)
    embeds[:, 8] = -0.0
    iv = INT_VIEW[dtype]
    assert torch.equal(add_subject_noise(embeds, noise, mask, 0.0).view(iv), embeds.view(iv))
    out = add_subject_noise(embeds, noise * float("inf"), mask, 3.0)
    assert torch.equal(out[~mask].view(iv), embeds[~mask].view(iv))


def test_subject_noise_seeding_rule() -> None:
    a = subject_noise(3, 4, 5, seed=7)
    assert torch.equal(a, subject_noise(3, 4, 5, seed=7))
    assert not torch.equal(a, subject_noise(3, 4, 5, seed=8))
    assert torch.equal(a, torch.randn(3, 4, 5, generator=_gen(7)))  # the documented rule
    assert subject_noise(3, 4, 5, seed=7, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_dispatch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1)
    monkeypatch.delenv(_dispatch.ENV, raising=False)
    assert _dispatch.choose(x) == "reference"  # CPU tensors, auto
    monkeypatch.setenv(_dispatch.ENV, "reference")
    assert _dispatch.choose(x) == "reference"
    monkeypatch.setenv(_dispatch.ENV, "cuda-please")
    with pytest.raises(InputError, match="MECHSCOPE_KERNELS"):
        _dispatch.choose(x)
    monkeypatch.setenv(_dispatch.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        _dispatch.choose(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.choose(x) == "triton"


def test_forced_triton_public_functions_match_reference(interpret, monkeypatch) -> None:
    monkeypatch.setenv(_dispatch.ENV, "triton")
    variants, clean, positions, heads = _scatter_case((3, 2, 5, 3, 7), torch.float16, 8, True)
    expected = _scatter_loop(variants, clean, positions, heads)
    assert torch.equal(scatter_patches(variants, clean, positions, heads), expected)
    embeds, noise, mask = _noise_case((3, 6, 5), torch.float32, 9, short=True, per_row=False)
    torch.testing.assert_close(
        add_subject_noise(embeds, noise, mask, 2.5), _noise_loop(embeds, noise, mask, 2.5)
    )


def test_scatter_bad_inputs_name_the_problem() -> None:
    v = torch.zeros(3, 2, 5, 4)
    c = torch.zeros(2, 5, 4)
    p = torch.tensor([0, 1, 2])
    cases = [
        ((v, torch.zeros(2, 4, 4), p, None), "clean has shape"),
        ((v, c.double(), p, None), "same float dtype"),
        ((v, c, torch.tensor([0, 1]), None), r"expected \[3\]"),
        ((v, c, torch.tensor([0.0, 1.0, 2.0]), None), "integer"),
        ((v, c, torch.tensor([0, 5, 1]), None), "position axis has 5"),
        ((v, c, torch.tensor([0, -2, 1]), None), "-1 for every"),
        ((v, c, p, torch.tensor([0, 0, 0])), "pass heads=None"),
        ((torch.zeros(3, 2, 5, 2, 4), torch.zeros(2, 5, 2, 4), p, None), "heads is None"),
        ((torch.zeros(3, 2, 5, 2, 4), torch.zeros(2, 5, 2, 4), p, torch.tensor([0, 2, 1])),
         "head axis has 2"),
        ((torch.zeros(2, 5, 4), c, p, None), "expected"),
    ]  # fmt: skip
    for args, msg in cases:
        with pytest.raises(InputError, match=msg):
            check_scatter(*args)
        with pytest.raises(BAD_INPUT):
            scatter_patches(*args)
    with pytest.raises(InputError, match="no_grad"):
        scatter_patches(v.requires_grad_(), c, p)


def test_noise_bad_inputs_name_the_problem() -> None:
    e = torch.zeros(2, 5, 4)
    n = torch.zeros(2, 5, 4)
    m = torch.tensor([False, True, True, False, False])
    cases = [
        ((e, torch.zeros(2, 5, 3), m, 1.0), "noise has shape"),
        ((e, torch.zeros(2, 3, 4), m, 1.0), "subject positions"),
        ((e, n, m.long(), 1.0), "bool"),
        ((e, n, torch.ones(3, 5, dtype=torch.bool), 1.0), "bool"),
        ((e, n, m, float("nan")), "finite"),
        ((e.long(), n, m, 1.0), "float"),
    ]
    for args, msg in cases:
        with pytest.raises(InputError, match=msg):
            check_noise(*args)
        with pytest.raises(BAD_INPUT):
            add_subject_noise(*args)
    with pytest.raises(InputError, match="no_grad"):
        add_subject_noise(e.requires_grad_(), n, m, 1.0)


def test_benchmark_quick_mode_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MECHSCOPE_KERNELS"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_kernels.py"), "--quick"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(line.startswith("{") for line in out.stdout.splitlines())


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="compiled Triton needs a CUDA device (the interpreter tests above cover the code on CPU)")
@pytest.mark.parametrize("shape", [(3, 17, 5, 13), (5, 3, 7, 1), (1, 1, 1, 1), (3, 17, 5, 3, 13), (7, 2, 3, 5, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_kernels_on_cuda_match_reference(shape, dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The public functions dispatch to compiled Triton on CUDA tensors and equal the reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MECHSCOPE_KERNELS", raising=False)
    variants, clean, positions, heads = _scatter_case(shape, dtype, 11, with_all=True)
    expected = scatter_ref.scatter_patches(variants.clone(), clean, positions, heads)
    out = variants.cuda()
    scatter_patches(out, clean.cuda(), positions.cuda(), None if heads is None else heads.cuda())
    assert torch.equal(out.cpu(), expected)
    embeds, noise, mask = _noise_case(shape[:2] + shape[-1:], dtype, 12, short=False, per_row=False)
    ref = add_subject_noise(embeds, noise, mask, 3.0)  # CPU tensors: the reference
    got = add_subject_noise(embeds.cuda(), noise.cuda(), mask.cuda(), 3.0).cpu()
    torch.testing.assert_close(got, ref)
