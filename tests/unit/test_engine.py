"""The patching engine's own forward (mechscope.attribution.engine): it is the bridge's forward
on every architecture it accepts, its suffix runs equal full patched runs, and the sweeps and
causal traces on it equal the hook path (itself pinned to TransformerLens's patching)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching

from mechscope.attribution import causal_trace, patch_sweep
from mechscope.attribution.engine import STAGES, Engine, Plan, Write, agrees
from mechscope.errors import HookNameError, InputError
from mechscope.models import load
from mechscope.probes import Tracer

BASE = "n_layers=3,d_model=32,n_heads=4,d_head=8,d_vocab=50,n_ctx=32,seed=3"
CONFIGS = {
    "ln_gelu_absolute": f"native:{BASE},d_mlp=64",
    "rms_rotary_gqa_gated": f"native:{BASE},d_mlp=64,positional_embedding_type=rotary,"
                            "n_key_value_heads=2,normalization_type=RMS,gated_mlp=true,act_fn=silu",
    "attn_only": f"native:{BASE},attn_only=true",
}  # fmt: skip
SITE_OF = {"resid_pre": "resid_pre", "z": "heads", "attn_out": "attn_out", "resid_mid": "resid_mid",
           "mlp_out": "mlp_out", "resid": "resid"}  # fmt: skip


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return load(CONFIGS[request.param])


def _gate(ours: torch.Tensor, peer: torch.Tensor) -> None:
    assert ours.shape == peer.shape
    err = float((ours.double() - peer.double()).abs().max())
    assert err <= 1e-4 * float(peer.abs().max()) + 1e-5, err


def _run(model, tokens):
    eng = Engine.of(model)
    assert eng is not None, Engine.why_not(model)
    sites = ("resid_pre", "heads", "attn_out", "resid") + (
        () if model.cfg.attn_only else ("resid_mid", "mlp_out"))
    with torch.no_grad(), Tracer(model, sites=sites) as tracer:
        logits, trace = tracer.forward(tokens)
        cache, x = eng.full(trace.get("resid_pre", 0))
    return eng, cache, x, logits, trace


def test_full_run_is_the_bridge_forward(model):
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    eng, cache, x, logits, trace = _run(model, tokens)
    own = eng.logits(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)
    assert agrees(own, logits)[0]
    for stage in STAGES:
        if stage in cache.acts:
            for layer in range(eng.n_layers):
                _gate(cache.get(stage, layer), trace.get(SITE_OF[stage], layer))


@pytest.mark.parametrize("stage", ["resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid"])
def test_suffix_with_a_write_equals_the_full_run_with_the_write(model, stage):
    """A row that joins at (layer, stage) at position p, with one value written there, equals a
    full forward (from layer 0, every position) with the same write: the prefix keys/values and
    the skipped layers are exactly what the full run computes."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 8), generator=g)
    eng, cache, _, _, _ = _run(model, tokens)
    if model.cfg.attn_only and stage in ("resid_mid", "mlp_out"):
        assert stage not in cache.acts  # attention-only: no MLP stages to write
        return
    n_layers, n_pos = eng.n_layers, 8
    shape = cache.get(stage, 0).shape[2:]
    rows = []
    for layer in range(n_layers):
        for pos in (2, 5, 7):
            for b in range(2):
                rows.append((layer, pos, b, torch.randn(shape, generator=g)))
    plan = Plan(target_rows=torch.tensor([r[2] for r in rows]), start=torch.tensor([r[1] for r in rows]),
                join_layer=torch.tensor([r[0] for r in rows]), n_pos=n_pos, stage=stage)  # fmt: skip
    for j, (layer, pos, _, value) in enumerate(rows):
        plan.add(layer, stage, Write(tokens=plan.token(torch.tensor([j]), torch.tensor([pos])),
                                     values=value[None]))  # fmt: skip
    with torch.no_grad():
        got = eng.suffix(plan, cache)
        for j, (layer, pos, b, value) in enumerate(rows):
            full = Plan(target_rows=torch.tensor([b]), start=torch.tensor([0]),
                        join_layer=torch.tensor([0]), n_pos=n_pos, stage="resid_pre")  # fmt: skip
            full.add(layer, stage, Write(tokens=torch.tensor([pos]), values=value[None]))
            want = eng.suffix(full, cache)  # every layer and position recomputed
            mine = got[plan.token(torch.tensor([j] * (n_pos - pos)), torch.arange(pos, n_pos))]
            torch.testing.assert_close(mine, want[pos:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "heads", "mlp_out", "resid_mid"])
@pytest.mark.parametrize("by", ["position", "all"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_engine_equals_hooks(model, site, by, direction, toy_task):
    batch = toy_task()
    if model.cfg.attn_only and site in ("resid_mid", "mlp_out"):
        with pytest.raises(HookNameError):
            patch_sweep(model, batch, site=site, by=by, direction=direction, progress=False)
        return
    fast = patch_sweep(model, batch, site=site, by=by, direction=direction, engine="engine", progress=False)
    slow = patch_sweep(model, batch, site=site, by=by, direction=direction, engine="hooks", progress=False)
    assert fast.work["path"] == "engine" and slow.work["path"] == "hooks"
    _gate(fast.scores, slow.scores)
    assert fast.n_skipped == slow.n_skipped
    assert fast.work["flops_vs_naive"] < slow.work["flops_vs_naive"]


def test_rotary_gqa_engine_equals_transformer_lens(toy_task):
    """Directly against the oracle, on the architecture the engine re-implements (rotary, GQA,
    RMSNorm, gated MLP)."""
    model = load(CONFIGS["rms_rotary_gqa_gated"])
    batch = toy_task()
    rows = torch.arange(3)

    def ld(logits):
        at = logits[rows, batch.answer_pos]
        return (at[rows, batch.answer] - at[rows, batch.corrupt_answer]).mean()

    with torch.no_grad():
        c, k = float(ld(model(batch.clean))), float(ld(model(batch.corrupt)))
        _, cache = model.run_with_cache(batch.clean)
    for site, fn in (("resid_pre", patching.get_act_patch_resid_pre),
                     ("heads", patching.get_act_patch_attn_head_out_by_pos),
                     ("mlp_out", patching.get_act_patch_mlp_out)):  # fmt: skip
        want = fn(model, batch.corrupt, cache, lambda lg: (ld(lg) - k) / (c - k))
        got = patch_sweep(model, batch, site=site, engine="engine", progress=False)
        _gate(got.scores, want)


def test_custom_metric_on_full_logits(model, toy_task):
    """A user metric reads full logits at every position: the engine assembles them from the
    target run (positions before the patch) and the suffix."""
    batch = toy_task()

    def metric(logits):
        return logits.log_softmax(-1)[:, :, 0].mean()

    fast = patch_sweep(model, (batch.clean, batch.corrupt), metric=metric, engine="engine", progress=False)
    slow = patch_sweep(model, (batch.clean, batch.corrupt), metric=metric, engine="hooks", progress=False)
    _gate(fast.scores, slow.scores)


def test_non_causal_model_falls_back_to_hooks(toy_task, monkeypatch):
    model = load(CONFIGS["ln_gelu_absolute"])
    for block in model.blocks:
        monkeypatch.setattr(block._original_component.attn._original_component, "causal", False)
    assert "not causal" in (Engine.why_not(model) or "")
    r = patch_sweep(model, toy_task(), progress=False)
    assert r.work["path"] == "hooks" and "not causal" in str(r.work["engine_skipped_because"])
    with pytest.raises(InputError, match="not causal"):
        patch_sweep(model, toy_task(), engine="engine", progress=False)


def test_bf16_screening_agrees_with_fp32(toy_task):
    model = load(CONFIGS["rms_rotary_gqa_gated"])
    batch = toy_task()
    exact = patch_sweep(model, batch, site="heads", progress=False)
    screen = patch_sweep(model, batch, site="heads", dtype="bfloat16", progress=False)
    assert screen.work["dtype"] == "bfloat16" and exact.work["dtype"] == "float32"
    # a screen ranks: the same top cells, rank correlation near 1 (values move by bf16 rounding,
    # amplified by the normalisation when the clean-corrupt gap is small)
    a, b = exact.scores.flatten(), screen.scores.flatten()
    top = set(a.abs().topk(5).indices.tolist())
    assert len(top & set(b.abs().topk(5).indices.tolist())) >= 4
    moved = a.abs() > 1e-3  # the no-op and dead cells are all ~0: their order is rounding noise
    ra, rb = a[moved].argsort().argsort().double(), b[moved].argsort().argsort().double()
    assert float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]) > 0.8
    assert float((a - b).abs().max()) < 0.25 * float(a.abs().max())
    with pytest.raises(InputError, match="screening"):
        patch_sweep(model, batch, dtype="bfloat16", engine="hooks", progress=False)
    with pytest.raises(InputError, match="dtype"):
        patch_sweep(model, batch, dtype="int8", progress=False)


@pytest.mark.parametrize("kind,severed", [("hidden", None), ("mlp", None), ("attn", None),
                                          ("hidden", "mlp"), ("hidden", "attn")])  # fmt: skip
def test_causal_trace_engine_equals_hooks(kind, severed):
    model = load(CONFIGS["rms_rotary_gqa_gated"])
    tokens = [3, 17, 5, 9, 22, 41, 8, 30]
    kw = dict(kind=kind, severed=severed, samples=4, window=2, progress=False)
    fast = causal_trace(model, tokens, (1, 4), engine="engine", **kw)
    slow = causal_trace(model, tokens, (1, 4), engine="hooks", **kw)
    assert fast.work["path"] == "engine" and slow.work["path"] == "hooks"
    _gate(fast.scores, slow.scores)
    assert fast.p_clean == pytest.approx(slow.p_clean, abs=1e-5)
    assert fast.n_skipped == slow.n_skipped


def test_plan_rejects_unsorted_joins_and_unknown_stages():
    with pytest.raises(ValueError, match="sorted"):
        Plan(target_rows=torch.tensor([0, 0]), start=torch.tensor([0, 0]),
             join_layer=torch.tensor([1, 0]), n_pos=3, stage="resid_pre")  # fmt: skip
    with pytest.raises(ValueError, match="stage"):
        Plan(target_rows=torch.tensor([0]), start=torch.tensor([0]), join_layer=torch.tensor([0]),
             n_pos=3, stage="ffn")  # fmt: skip
