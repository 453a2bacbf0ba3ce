"""Interventions, checked by defining properties and against TransformerLens's patching (the oracle)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching

from mechscope.errors import HookNameError, InputError
from mechscope.probes import Tracer, count_hooks, hooked, trace
from mechscope.probes.interventions import (
    AddVector,
    Apply,
    MeanAblate,
    Patch,
    Resample,
    Scale,
    Zero,
    intervene,
)


def _pair(n=3, pos=6, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (n, pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:3] = torch.randint(1, vocab, (n, 2), generator=g)
    return clean, corrupt


def _metric(logits):  # a scalar that depends on every row's last position
    return logits[:, -1].log_softmax(-1)[:, 7].mean()


def test_identity_changes_nothing_bit_for_bit(tiny):
    tokens, _ = _pair()
    clean = tiny(tokens)
    specs = [Apply(site=s, layer=layer, fn=lambda a: a) for s in ("heads", "resid_pre", "ffn",
                                                                 "patterns", "attn_out")
             for layer in range(2)]
    specs += [Scale(site="heads", layer=1, heads=(2,), positions=(0, -1), factor=1.0)]
    with intervene(tiny, specs):
        out = tiny(tokens)
    assert torch.equal(out, clean)
    assert count_hooks(tiny) == 0


def test_patching_a_different_value_changes_the_output_and_restoring_everything_recovers_clean(tiny):
    clean, corrupt = _pair()
    clean_logits = tiny(clean)
    corrupt_logits = tiny(corrupt)
    assert not torch.allclose(clean_logits, corrupt_logits)
    src = trace(tiny, clean, sites=("resid_pre",), progress=False)
    # restoring every position of the residual stream before layer 0 gives the clean run exactly
    with intervene(tiny, Patch(site="resid_pre", layer=0, source=src)):
        restored = tiny(corrupt)
    torch.testing.assert_close(restored, clean_logits, atol=1e-5, rtol=1e-5)
    # a patch of one corrupted position changes the output, and only from that position on
    with intervene(tiny, Patch(site="resid_pre", layer=1, positions=(2,), source=src)):
        patched = tiny(corrupt)
    assert not torch.allclose(patched[:, 2:], corrupt_logits[:, 2:])
    torch.testing.assert_close(patched[:, :2], corrupt_logits[:, :2])


def test_resid_pre_sweep_matches_transformer_lens(tiny):
    clean, corrupt = _pair()
    _, clean_cache = tiny.run_with_cache(clean)
    oracle = patching.get_act_patch_resid_pre(tiny, corrupt, clean_cache, _metric)  # [layer, pos]
    src = trace(tiny, clean, sites=("resid_pre",), progress=False)
    ours = torch.zeros_like(oracle)
    for layer in range(tiny.cfg.n_layers):
        for pos in range(clean.shape[1]):
            with intervene(tiny, Patch(site="resid_pre", layer=layer, positions=(pos,), source=src)):
                ours[layer, pos] = _metric(tiny(corrupt))
    torch.testing.assert_close(ours, oracle, atol=1e-5, rtol=1e-5)
    assert float(oracle.std()) > 0  # the sweep is not trivially constant


def test_head_by_position_sweep_matches_transformer_lens(tiny):
    clean, corrupt = _pair(pos=5)
    _, clean_cache = tiny.run_with_cache(clean)
    oracle = patching.get_act_patch_attn_head_out_by_pos(tiny, corrupt, clean_cache, _metric)
    src = trace(tiny, clean, sites=("heads",), progress=False)
    ours = torch.zeros_like(oracle)  # [layer, pos, head]
    for layer in range(2):
        for pos in range(5):
            for head in range(4):
                spec = Patch(site="heads", layer=layer, heads=(head,), positions=(pos,), source=src)
                with intervene(tiny, spec):
                    ours[layer, pos, head] = _metric(tiny(corrupt))
    torch.testing.assert_close(ours, oracle, atol=1e-5, rtol=1e-5)


def test_zero_ablation_of_one_head_equals_a_hand_written_hook(tiny):
    tokens, _ = _pair()

    def zero_head(z, hook):  # [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, 1] = 0.0
        return z

    with hooked(tiny, [("blocks.0.attn.hook_z", zero_head)]):
        expected = tiny(tokens)
    with intervene(tiny, Zero(site="heads", layer=0, heads=(1,))):
        got = tiny(tokens)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, tiny(tokens))


def test_a_trace_inside_intervene_records_the_patched_value_whatever_the_nesting(tiny):
    tokens, _ = _pair()
    vec = torch.arange(32.0)
    plain = trace(tiny, tokens, sites=("resid_pre",), progress=False).resid_pre(1)
    spec = AddVector(site="resid_pre", layer=1, vector=vec)
    with intervene(tiny, spec), Tracer(tiny, sites=("resid_pre",), layers=(1,)) as tracer:
        inner = tracer.run(tokens, progress=False).resid_pre(1)  # tracer attached after
    with Tracer(tiny, sites=("resid_pre",), layers=(1,)) as tracer, intervene(tiny, spec):
        outer = tracer.run(tokens, progress=False).resid_pre(1)  # tracer attached before
    torch.testing.assert_close(inner, plain + vec)
    torch.testing.assert_close(outer, plain + vec)


def test_nested_interventions_apply_outer_then_inner(tiny):
    tokens, _ = _pair()
    plain = trace(tiny, tokens, sites=("resid_pre",), layers=(1,), progress=False).resid_pre(1)
    with intervene(tiny, Scale(site="resid_pre", layer=1, factor=2.0)), \
            intervene(tiny, AddVector(site="resid_pre", layer=1, vector=torch.ones(32))):
        got = trace(tiny, tokens, sites=("resid_pre",), layers=(1,), progress=False).resid_pre(1)
    torch.testing.assert_close(got, plain * 2.0 + 1.0)


def test_mean_and_resample_ablation_write_what_they_say(tiny):
    clean, corrupt = _pair(n=4)
    src = trace(tiny, corrupt, sites=("heads",), progress=False)
    z = src.heads(1)
    with intervene(tiny, MeanAblate(site="heads", layer=1, heads=(0,), source=src)):
        got = trace(tiny, clean, sites=("heads",), layers=(1,), progress=False).heads(1)
    plain = trace(tiny, clean, sites=("heads",), layers=(1,), progress=False).heads(1)
    torch.testing.assert_close(got[:, :, 0], z[:, :, 0].mean(0, keepdim=True).expand(4, -1, -1))
    torch.testing.assert_close(got[:, :, 1:], plain[:, :, 1:])
    with intervene(tiny, MeanAblate(site="heads", layer=1, heads=(0,), source=src, over="batch_pos")):
        got = trace(tiny, clean, sites=("heads",), layers=(1,), progress=False).heads(1)
    torch.testing.assert_close(got[:, :, 0], z[:, :, 0].mean((0, 1)).expand(4, 6, -1))
    rs = Resample(site="heads", layer=1, source=src, seed=3)
    with intervene(tiny, rs):
        a = trace(tiny, clean, sites=("heads",), layers=(1,), progress=False).heads(1)
        b = trace(tiny, clean, sites=("heads",), layers=(1,), progress=False).heads(1)
    assert torch.equal(a, b)  # the same draw on every forward
    for row in a:  # every row is one of the source rows
        assert any(torch.equal(row, s) for s in z)


def test_scale_zero_equals_zero_ablation_and_per_row_positions(tiny):
    tokens, _ = _pair()
    with intervene(tiny, Scale(site="ffn", layer=0, factor=0.0, positions=(3,))):
        a = tiny(tokens)
    with intervene(tiny, Zero(site="ffn", layer=0, positions=(3,))):
        b = tiny(tokens)
    assert torch.equal(a, b)
    per_row = torch.tensor([[3], [3], [3]])
    with intervene(tiny, Zero(site="ffn", layer=0, positions=per_row)):
        c = tiny(tokens)
    assert torch.equal(c, b)
    rows = torch.tensor([[1], [4], [5]])  # a different position in each row
    with intervene(tiny, Zero(site="ffn", layer=0, positions=rows)), \
            Tracer(tiny, sites=("ffn",), layers=(0,)) as tracer:
        ffn = tracer.run(tokens, progress=False).ffn(0)
    for i, p in enumerate([1, 4, 5]):
        assert float(ffn[i, p].abs().max()) == 0.0
        assert float(ffn[i].abs().sum()) > 0.0


@pytest.mark.parametrize(
    "spec, words",
    [
        (Zero(site="bogus", layer=0), "unknown site"),
        (Zero(site="heads", layer=5), "out of range"),
        (Zero(site="heads", layer=0, heads=(4,)), "out of range"),
        (Zero(site="resid_pre", layer=0, heads=(0,)), "no head axis"),
        (Zero(site="head_resid", layer=0), "computed"),
        (Zero(site="heads", layer=0, positions=()), "selects nothing"),
        (Zero(site="attn_scores", layer=0), "not available on this model"),
        (Zero(site="k", layer=0, heads=(4,)), "out of range"),
    ],
)
def test_bad_specs_are_refused_before_anything_is_attached(tiny, spec, words):
    with pytest.raises((InputError, HookNameError), match=words), intervene(tiny, spec):
        pass
    assert count_hooks(tiny) == 0


def test_mismatched_source_and_out_of_range_positions_are_clear_errors(tiny):
    clean, _ = _pair(pos=6)
    short = trace(tiny, clean[:, :4], sites=("heads",), progress=False)
    with pytest.raises(InputError, match="same number of tokens"), \
            intervene(tiny, Patch(site="heads", layer=0, source=short)):
        tiny(clean)
    with pytest.raises(InputError, match="outside a sequence"), \
            intervene(tiny, Zero(site="heads", layer=0, positions=(9,))):
        tiny(clean)
    assert count_hooks(tiny) == 0


def test_hooked_checks_signatures_and_counts_aliases_once(tiny):
    with pytest.raises(InputError, match="hook="), \
            hooked(tiny, [("blocks.0.hook_resid_pre", lambda a, h: None)]):
        pass
    assert count_hooks(tiny) == 0
    with hooked(tiny, [("blocks.0.hook_resid_pre", lambda act, hook: None)]):
        assert count_hooks(tiny) == 1  # one hook, though the point has two names
        assert tiny.hook_dict["blocks.0.hook_in"] is tiny.hook_dict["blocks.0.hook_resid_pre"]
    assert count_hooks(tiny) == 0


def test_mlp_sites_are_refused_on_an_attention_only_model(tiny_attn):
    with pytest.raises(InputError, match="attention-only"), intervene(tiny_attn, Zero(site="ffn", layer=0)):
        pass


def test_kv_heads_of_a_grouped_query_model_are_addressed_by_kv_index():
    from mechscope.models import load

    gqa = load("native:n_layers=1,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=16,"
               "n_key_value_heads=2,seed=3")
    tokens, _ = _pair()
    with pytest.raises(InputError, match="it has 2 heads"), intervene(gqa, Zero(site="v", layer=0, heads=(2,))):
        pass
    with intervene(gqa, Zero(site="v", layer=0, heads=(1,))), \
            Tracer(gqa, sites=("v", "patterns", "heads"), layers=(0,)) as tracer:
        tr = tracer.run(tokens, progress=False)
    assert float(tr.v(0)[:, :, 1].abs().max()) == 0.0 and float(tr.v(0)[:, :, 0].abs().max()) > 0
    # query heads 2 and 3 read kv head 1 (repeat_interleave grouping): their outputs vanish
    assert float(tr.heads(0)[:, :, 2:].abs().max()) == 0.0
    assert float(tr.heads(0)[:, :, :2].abs().max()) > 0.0


def test_writing_resid_mid_changes_only_the_mlp_input_on_the_bridge(tiny):
    """Documented in probes.sites: the skip connection around the MLP carries the unpatched value."""
    tokens, _ = _pair()
    sites = ("resid_mid", "mlp_out", "resid")
    base = trace(tiny, tokens, sites=sites, layers=(0,), progress=False)
    with intervene(tiny, AddVector(site="resid_mid", layer=0, vector=torch.ones(32))):
        got = trace(tiny, tokens, sites=sites, layers=(0,), progress=False)
    torch.testing.assert_close(got.get("resid_mid", 0), base.get("resid_mid", 0) + 1.0)
    assert not torch.allclose(got.mlp_out(0), base.mlp_out(0))
    torch.testing.assert_close(got.resid(0), base.get("resid_mid", 0) + got.mlp_out(0))
