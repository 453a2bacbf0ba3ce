"""The attention-statistics kernel: the blockwise reference against a dense float64 softmax, the
defining properties (rows sum to one, entropy of one-hot and uniform rows, ACT on a uniform
pattern), Triton (by its interpreter on the CPU) against the reference over odd shapes and dtypes,
the memory bound (no ``[T, T]`` tensor, peak RSS of a long input), input checks and dispatch.

Tolerances: the dense oracle scores the *same* (already rounded) inputs in float64, so the only
error is fp32 arithmetic: ``atol = rtol = 1e-5`` for fp32 inputs, ``2e-5`` for fp16/bf16 inputs
(their larger score range costs a few more ulp in the exponent); Triton against the reference:
``1e-5`` for every dtype (both score in fp32). Indices (argmax, top-k) must be equal.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jaxtyping import TypeCheckError
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mechscope.errors import InputError
from mechscope.kernels import AttnStats, _dispatch, act_mean, attention_stats, stats_from_pattern
from mechscope.kernels.attn_stats import check
from mechscope.kernels.attn_stats import reference as ref

ROOT = Path(__file__).resolve().parents[2]
BAD_INPUT = (InputError, TypeCheckError)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
INDEX_FIELDS = ("argmax", "top_idx")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch):
    """Run the Triton kernels with the interpreter on CPU tensors (read when a kernel is jitted)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from mechscope.kernels.attn_stats import triton as stats_tri

    return stats_tri


def _qk(shape: tuple[int, int, int, int, int], dtype: torch.dtype, seed: int):
    """Random ``q [batch, head, pos, d_head]`` and ``k [batch, kv_head, pos, d_head]``."""
    n_batch, n_head, n_kv, n_pos, d = shape
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(n_batch, n_head, n_pos, d, generator=g)).to(dtype)
    k = torch.randn(n_batch, n_kv, n_pos, d, generator=g).to(dtype)
    return q, k


def _dense(q, k, scale: float, lengths, causal: bool):
    """The definition, materialised in float64: ``(pattern [b, h, T, T], lse [b, h, T])``."""
    n_pos = q.shape[2]
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # HF repeat_kv
    s = scale * q.double() @ kk.transpose(-1, -2)
    keys = torch.arange(n_pos)
    hidden = keys >= lengths[:, None, None, None]
    if causal:
        hidden = hidden | (keys > keys[:, None])
    s = s.masked_fill(hidden, float("-inf"))
    real = keys < lengths[:, None]  # [batch, query]
    lse = torch.logsumexp(s, dim=-1).masked_fill(~real[:, None], float("-inf"))
    return torch.softmax(s, dim=-1), lse


def _assert_stats_close(got: AttnStats, want: AttnStats, tol: float, lse: bool = True) -> None:
    for name in AttnStats._fields:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        if name in INDEX_FIELDS:
            assert a.dtype == torch.int64 and torch.equal(a, b), name
        elif name != "lse" or lse:
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a, b.float(), atol=tol, rtol=tol, msg=name)


# (batch, head, kv_head, pos, d_head), lengths, causal, block: T not a multiple of the block,
# T = 1, GQA ratios 1 and 3, right padding, non-causal, the default block
CASES = [
    ((2, 6, 2, 37, 16), [37, 30], True, 16),
    ((1, 3, 3, 1, 16), [1], True, 16),
    ((2, 3, 3, 37, 8), [21, 37], False, 16),
    ((3, 4, 4, 20, 16), [20, 7, 13], True, None),
    ((2, 6, 2, 33, 16), [33, 33], True, 5),
]


def _selection(n_pos: int, lengths: list[int]):
    """Selected queries (negative ones included) and segments that fit every row."""
    short = min(lengths)
    queries = sorted({0, short // 2, short - 1, -1, -short})
    segments = [(0, 1), (0, n_pos), (n_pos // 3, n_pos), (max(0, n_pos - 4), n_pos)]
    return queries, segments


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_dense_softmax(case, top_k, dtype) -> None:
    shape, lens, causal, block = case
    q, k = _qk(shape, dtype, seed=1)
    lengths = torch.tensor(lens)
    queries, segments = _selection(shape[3], lens)
    top_k = min(top_k, shape[3])
    got = attention_stats(
        q, k, scale=0.25, lengths=lengths, causal=causal, queries=queries, top_k=top_k,
        segments=segments, block=block,
    )  # fmt: skip
    pattern, lse = _dense(q, k, 0.25, lengths, causal)
    want = stats_from_pattern(
        pattern, lengths=lengths, queries=queries, top_k=top_k, segments=segments
    )
    _assert_stats_close(got, want, TOL[dtype], lse=False)
    torch.testing.assert_close(got.lse, lse.float(), atol=TOL[dtype], rtol=TOL[dtype])
    n_sel = len(queries)
    assert got.argmax.shape == (shape[0], shape[1], n_sel)
    assert got.top_idx.shape == (shape[0], shape[1], n_sel, top_k)
    assert torch.equal(got.top_idx[..., 0], got.argmax)


def test_reference_per_row_queries_and_tensor_segments() -> None:
    q, k = _qk((2, 2, 1, 12, 16), torch.float32, seed=2)
    lengths = torch.tensor([12, 9])
    queries = torch.tensor([[3, -1], [8, -9]])  # [batch, selected]: row 1's -9 is its query 0
    segments = torch.tensor([[0, 2], [2, 12]])
    got = attention_stats(
        q, k, scale=0.3, lengths=lengths, queries=queries, top_k=2, segments=segments
    )
    pattern, _ = _dense(q, k, 0.3, lengths, True)
    want = stats_from_pattern(pattern, lengths=lengths, queries=queries, top_k=2, segments=segments)
    _assert_stats_close(got, want, 1e-5, lse=False)
    assert got.top_idx[1, :, 1].tolist() == [[0, -1], [0, -1]]  # query 0 sees one key
    assert got.top_weight[1, :, 1].tolist() == [[1.0, 0.0], [1.0, 0.0]]


@pytest.mark.parametrize("causal", [True, False])
def test_rows_sum_to_one(causal) -> None:
    q, k = _qk((2, 6, 2, 29, 16), torch.float32, seed=3)
    lengths = torch.tensor([29, 17])
    st = attention_stats(
        q, k, scale=0.25, lengths=lengths, causal=causal, segments=[(0, 29)], block=8
    )
    n_real = lengths.float()[:, None].expand(2, 6)
    torch.testing.assert_close(st.received.sum(dim=-1), n_real, atol=1e-5, rtol=1e-6)
    real = (torch.arange(29) < lengths[:, None])[:, None, :].expand(2, 6, 29)
    mass = st.segment_mass[..., 0]
    torch.testing.assert_close(mass[real], torch.ones(int(real.sum())), atol=1e-6, rtol=0)
    assert bool((mass[~real] == 0).all()) and bool((st.entropy[~real] == 0).all())
    assert bool((st.lse[~real] == float("-inf")).all()) and bool(torch.isfinite(st.lse[real]).all())
    assert bool((st.received[1, :, 17:] == 0).all())  # padded keys receive nothing


def test_entropy_of_one_hot_and_uniform_rows() -> None:
    n_pos, d = 9, 16
    k = torch.zeros(1, 1, n_pos, d)
    k[0, 0, 4, 0] = 100.0  # key 4 wins every row by a score of 1e4: exp(-1e4) = 0 in fp32
    q = torch.zeros(1, 1, n_pos, d)
    q[..., 0] = 100.0
    hot = attention_stats(q, k, scale=1.0, causal=False, queries=[0, -1], top_k=2)
    assert bool((hot.entropy == 0).all())
    assert hot.argmax.tolist() == [[[4, 4]]] and bool((hot.max_weight == 1).all())
    assert bool((hot.top_weight[..., 1] == 0).all())
    uni = attention_stats(torch.zeros(2, 3, n_pos, d), torch.randn(2, 1, n_pos, d), scale=0.5)
    n_seen = torch.arange(1, n_pos + 1, dtype=torch.float32)  # causal: row i sees i + 1 keys
    torch.testing.assert_close(uni.entropy, n_seen.log().expand(2, 3, n_pos), atol=1e-6, rtol=0)
    torch.testing.assert_close(uni.lse, n_seen.log().expand(2, 3, n_pos), atol=1e-6, rtol=0)


def test_act_mean_on_uniform_pattern() -> None:
    n_pos, d = 11, 16
    lengths = torch.tensor([11, 6])
    q, k = torch.zeros(2, 2, n_pos, d), torch.randn(2, 2, n_pos, d)
    for causal in (True, False):
        st = attention_stats(q, k, scale=0.125, lengths=lengths, causal=causal)
        act = act_mean(st.received, lengths, causal=causal)
        for b, length in enumerate(lengths.tolist()):
            for j in range(n_pos):
                if j >= length:
                    want = 0.0
                elif causal:  # queries j..L-1, each spreading 1 over i + 1 keys
                    want = sum(1 / (i + 1) for i in range(j, length)) / (length - j)
                else:
                    want = 1 / length
                torch.testing.assert_close(act[b, :, j], torch.full((2,), want), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        act_mean(torch.ones(1, 1, 4)), torch.tensor([[[1 / 4, 1 / 3, 1 / 2, 1]]])
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(interpret, case, dtype) -> None:
    shape, lens, causal, block = case
    q, k = _qk(shape, dtype, seed=4)
    lengths = torch.tensor(lens)
    queries, segments = _selection(shape[3], lens)
    top_k = min(3, shape[3])
    lens_t, sel, seg = check(q, k, 0.25, lengths, queries, top_k, segments, block)
    want = ref.attention_stats(q, k, 0.25, lens_t, causal, sel, top_k, seg, block)
    got = interpret.attention_stats(q, k, 0.25, lens_t, causal, sel, top_k, seg, block)
    _assert_stats_close(got, want, 1e-5)
    no_seg = interpret.attention_stats(q, k, 0.25, lens_t, causal, sel, 1, seg[:0], block)
    assert no_seg.segment_mass.shape == (*shape[:2], shape[3], 0)
    torch.testing.assert_close(no_seg.entropy, want.entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(no_seg.top_idx[..., 0], want.argmax)


def test_triton_strided_inputs_and_public_dispatch(interpret, monkeypatch) -> None:
    monkeypatch.setenv(_dispatch.ENV, "triton")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 19, 4, 16, generator=g).transpose(1, 2)  # [batch, head, pos, d] strided
    k = torch.randn(2, 19, 2, 16, generator=g).transpose(1, 2)
    kwargs = dict(lengths=torch.tensor([19, 11]), queries=[-1, 2], top_k=2, segments=[(0, 3)])
    got = attention_stats(q, k, scale=0.25, block=16, **kwargs)
    monkeypatch.setenv(_dispatch.ENV, "reference")
    want = attention_stats(q, k, scale=0.25, block=16, **kwargs)
    _assert_stats_close(got, want, 1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def test_reference_never_builds_a_query_by_key_tensor() -> None:
    n_head, n_pos, block = 2, 256, 32
    q, k = _qk((1, n_head, n_head, n_pos, 16), torch.float32, seed=6)
    with _LargestTensor() as mode:
        attention_stats(
            q, k, scale=0.25, causal=False, queries=[-1], top_k=4, segments=[(0, 8)], block=block
        )
    assert mode.most <= n_head * block * n_pos  # one block of scores
    assert mode.most < n_pos * n_pos


_RSS_SCRIPT = r"""
import torch
from mechscope.kernels import attention_stats

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def growth(fn):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss("VmRSS:")
    fn()
    return rss("VmHWM:") - base

T = 12288
g = torch.Generator().manual_seed(0)
q, k = torch.randn(1, 1, T, 16, generator=g), torch.randn(1, 1, T, 16, generator=g)
attention_stats(q[:, :, :64], k[:, :, :64], scale=0.25)  # first-call allocations
run = lambda: attention_stats(q, k, scale=0.25, queries=[-1], top_k=4, segments=[(0, 4)])
full = lambda: torch.ones(T, T).sum()
print(growth(run), growth(full), T * T * 4)
"""


def test_reference_peak_memory_is_far_below_one_full_pattern() -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    env = {k: v for k, v in os.environ.items() if k not in (_dispatch.ENV, "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=300,
        cwd=ROOT, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    grew, control, full = (int(x) for x in out.stdout.split())
    print(f"peak RSS growth: attention_stats {grew / 2**20:.1f} MiB, a [T, T] fp32 tensor "
          f"{control / 2**20:.1f} MiB (its size {full / 2**20:.1f} MiB)")  # fmt: skip
    assert control > 0.9 * full  # the measurement sees a full pattern
    assert grew < full / 4


def test_bad_inputs_name_the_problem() -> None:
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    n = dict(lengths=None, queries=None, top_k=1, segments=None, block=None)
    nan_q = q.clone()
    nan_q[0, 0, 0, 0] = float("nan")
    inf_k = k.clone()
    inf_k[1, 1, 5, 7] = float("inf")
    cases = [
        (dict(k=torch.randn(2, 3, 6, 8)), r"4 % 3 != 0"),
        (dict(k=torch.randn(1, 2, 6, 8)), "disagree on batch"),
        (dict(k=torch.randn(2, 2, 5, 8)), "disagree on batch, pos"),
        (dict(k=torch.randn(2, 2, 6, 4)), "d_head"),
        (dict(segments=[(-1, 3)]), r"segment \(-1, 3\) is outside the sequence of 6 tokens"),
        (dict(segments=[(2, 7)]), r"segment \(2, 7\) is outside"),
        (dict(segments=[(3, 3)]), r"segment \(3, 3\) is outside"),
        (dict(segments=[(1, 2, 3)]), "start, end"),
        (dict(queries=[6]), "selected query 6 is out of range"),
        (dict(queries=[-7]), "selected query -7 is out of range"),
        (dict(queries=[4], lengths=torch.tensor([6, 3])), "out of range for row 1"),
        (dict(queries=[0.5]), "int positions"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=7), "top_k is 7"),
        (dict(q=nan_q), "NaN"),
        (dict(k=inf_k), "NaN or inf"),
        (dict(q=q.long(), k=k.long()), "float"),
        (dict(k=k.half()), "one dtype"),
        (dict(scale=float("nan")), "scale"),
        (dict(scale=0.0), "positive finite"),
        (dict(scale=-1.0), "scale"),
        (dict(lengths=torch.tensor([0, 6])), r"1\.\.6"),
        (dict(lengths=torch.tensor([7, 6])), "real tokens"),
        (dict(lengths=torch.tensor([6.0, 6.0])), "integer"),
        (dict(block=0), "block"),
        (dict(q=torch.randn(4, 6, 8)), "4-D"),
    ]
    for change, msg in cases:
        args = dict(q=q, k=k, scale=0.25, **n) | change
        with pytest.raises(InputError, match=msg):
            check(**args)
        with pytest.raises(BAD_INPUT):
            attention_stats(args.pop("q"), args.pop("k"), **args)
    with pytest.raises(InputError, match="query == key"):
        stats_from_pattern(torch.rand(1, 2, 3, 4))
    with pytest.raises(InputError, match="top_k"):
        stats_from_pattern(torch.rand(1, 2, 3, 3), top_k=4)


def test_dispatch_default_is_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k = _qk((1, 2, 2, 5, 16), torch.float32, seed=7)
    monkeypatch.delenv(_dispatch.ENV, raising=False)
    assert _dispatch.choose(q, k) == "reference"
    monkeypatch.setenv(_dispatch.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        attention_stats(q, k, scale=0.25)


def test_outputs_need_no_grad() -> None:
    q, k = _qk((1, 2, 1, 5, 16), torch.float32, seed=8)
    st = attention_stats(q.requires_grad_(), k, scale=0.25, queries=[-1])
    assert not any(t.requires_grad for t in st)
    assert math.isclose(float(st.received.sum()), 10.0, rel_tol=1e-6)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(
    not CUDA,
    reason="compiled Triton needs a CUDA device (the interpreter tests above cover the code on CPU)",
)
@pytest.mark.parametrize(
    "shape", [(2, 6, 2, 37, 16), (1, 3, 3, 1, 16), (2, 8, 2, 300, 64), (1, 4, 4, 129, 128)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_kernel_on_cuda_matches_reference(
    shape, dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The public function dispatches to compiled Triton on CUDA tensors and equals the reference.

    ``1e-4``: the GPU's ``exp`` and summation order differ from the CPU's by a few ulp per term.
    """
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(_dispatch.ENV, raising=False)
    q, k = _qk(shape, dtype, seed=9)
    n_pos = shape[3]
    lens = [n_pos, max(1, n_pos - 7)][: shape[0]]
    queries, segments = _selection(n_pos, lens)
    kwargs = dict(
        lengths=torch.tensor(lens), queries=queries, top_k=min(3, n_pos), segments=segments
    )
    for causal in (True, False):
        want = attention_stats(q, k, scale=0.125, causal=causal, **kwargs)  # CPU: the reference
        cuda_kwargs = dict(kwargs, lengths=kwargs["lengths"].cuda())
        got = attention_stats(q.cuda(), k.cuda(), scale=0.125, causal=causal, **cuda_kwargs)
        _assert_stats_close(AttnStats(*(t.cpu() for t in got)), want, 1e-4)
