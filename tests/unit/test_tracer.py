"""The tracer, checked by its defining properties on tiny models."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import HookNameError, InputError, StoreError
from mechscope.probes import (
    Patch,
    TraceConfig,
    Tracer,
    count_hooks,
    hook_for,
    hooked,
    intervene,
    iter_shards,
    open_trace,
    trace,
)
from mechscope.probes.sites import SITES


def _tokens(n=3, pos=7, vocab=50, seed=0):
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


# The TransformerLens hook each site must read, written out literally (not through hook_for), so a
# swapped entry in the site table fails here.
LITERAL_HOOKS = {
    "heads": "blocks.{l}.attn.hook_z",
    "patterns": "blocks.{l}.attn.hook_pattern",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "ffn_pre": "blocks.{l}.mlp.hook_pre",
    "ffn": "blocks.{l}.mlp.hook_post",
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid": "blocks.{l}.hook_resid_post",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
}


def test_every_site_matches_run_with_cache(tiny):
    tokens = _tokens()
    sites = tuple(LITERAL_HOOKS)
    assert set(sites) | {"head_resid", "attn_scores"} == set(SITES)
    tr = trace(tiny, tokens, sites=sites, progress=False)
    _, cache = tiny.run_with_cache(tokens)
    for site in sites:
        for layer in range(tiny.cfg.n_layers):
            torch.testing.assert_close(tr.get(site, layer), cache[LITERAL_HOOKS[site].format(l=layer)])
    assert tr.heads(0).shape == (3, 7, 4, 8)
    assert tr.pattern(1).shape == (3, 4, 7, 7)
    assert tr.ffn(0).shape == (3, 7, 64)
    assert tr.stack("resid").shape == (2, 3, 7, 32)
    assert count_hooks(tiny) == 0


def test_residual_stream_adds_up(tiny):
    """resid_pre(l+1) == resid(l), resid_mid(l) == resid_pre(l) + attn_out(l), and
    resid(l) == resid_mid(l) + mlp_out(l)."""
    tr = trace(tiny, _tokens(), sites=("resid_pre", "resid_mid", "resid", "attn_out", "mlp_out"),
               progress=False)
    torch.testing.assert_close(tr.resid_pre(1), tr.resid(0))
    for layer in range(2):
        torch.testing.assert_close(tr.resid_pre(layer) + tr.attn_out(layer), tr.get("resid_mid", layer),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tr.get("resid_mid", layer) + tr.mlp_out(layer), tr.resid(layer),
                                   atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tr.resid_pre(0), tr.resid(0))
    for layer in range(2):
        torch.testing.assert_close(
            tr.resid_pre(layer) + tr.attn_out(layer) + tr.mlp_out(layer), tr.resid(layer),
            atol=1e-5, rtol=1e-5,
        )


def test_patterns_are_causal_distributions(tiny):
    tr = trace(tiny, _tokens(), sites=("patterns",), progress=False)
    p = tr.pattern(0)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    assert float(p.triu(1).abs().max()) == 0.0


def test_head_resid_sums_to_attn_out(tiny):
    tr = trace(tiny, _tokens(), sites=("head_resid", "attn_out"), progress=False)
    for layer in range(2):
        b_o = tiny.blocks[layer].attn.b_O
        torch.testing.assert_close(
            tr.head_resid(layer).sum(2) + b_o, tr.attn_out(layer), atol=1e-5, rtol=1e-5
        )


def test_restrictions_are_slices_of_the_full_trace(tiny):
    tokens = _tokens(n=4, pos=9)
    full = trace(tiny, tokens, sites=("heads", "patterns", "head_resid"), progress=False)
    part = trace(
        tiny,
        tokens,
        sites=("heads", "patterns", "head_resid"),
        layers=(1,),
        heads=(3, 1),
        positions=(0, -1),
        progress=False,
    )
    assert part.layers("heads") == [1]
    keep = torch.tensor([0, 8])
    torch.testing.assert_close(part.heads(1), full.heads(1)[:, keep][:, :, [3, 1]])
    torch.testing.assert_close(part.pattern(1), full.pattern(1)[:, [3, 1]][:, :, keep])
    torch.testing.assert_close(
        part.head_resid(1), full.head_resid(1)[:, keep][:, :, [3, 1]], atol=1e-5, rtol=1e-5
    )
    with pytest.raises(HookNameError, match="no 'heads' at layer 0"):
        part.heads(0)


def test_dtype_is_applied(tiny):
    tr = trace(tiny, _tokens(), sites=("resid",), dtype="bfloat16", progress=False)
    assert tr.resid(0).dtype == torch.bfloat16


def test_patching_a_site_with_its_own_value_changes_nothing(tiny):
    tokens = _tokens()
    clean = tiny(tokens)
    tr = trace(tiny, tokens, sites=("heads", "ffn", "resid"), progress=False)
    hooks = [
        (hook_for(s, layer), (lambda v: lambda act, hook: v.clone())(tr.get(s, layer)))
        for s in ("heads", "ffn", "resid")
        for layer in range(2)
    ]
    with hooked(tiny, hooks):
        patched = tiny(tokens)
    torch.testing.assert_close(patched, clean)
    assert count_hooks(tiny) == 0
    # ... and the same hooks with another run's values must change it (patches are not ignored)
    other = trace(tiny, _tokens(seed=1), sites=("heads", "ffn", "resid"), progress=False)
    for s in ("heads", "ffn", "resid"):
        hook = (hook_for(s, 0), (lambda v: lambda act, hook: v.clone())(other.get(s, 0)))
        with hooked(tiny, [hook]):
            assert not torch.allclose(tiny(tokens), clean), s
        with intervene(tiny, Patch(site=s, layer=0, source=other)):
            assert not torch.allclose(tiny(tokens), clean), s


RAGGED = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [12, 13, 14, 15], [3, 3]]


def test_ragged_prompts_are_padded_and_masked(tiny):
    rows = RAGGED[:3]
    batched = trace(tiny, rows, sites=("heads", "resid"), batch_size=3, progress=False)
    for i, row in enumerate(rows):
        alone = trace(tiny, [row], sites=("heads", "resid"), progress=False)
        n = len(row)
        torch.testing.assert_close(batched.heads(1)[i, :n], alone.heads(1)[0], atol=1e-5, rtol=1e-5)
        assert int(batched.top_tokens[i, 0]) == int(alone.top_tokens[0, 0])
    assert batched.lengths.tolist() == [6, 2, 3]


@pytest.mark.parametrize("streamed", [False, True])
def test_ragged_multi_batch_trace_equals_one_prompt_at_a_time(tiny, tmp_path, streamed):
    """batch_size < number of prompts: every row equals that prompt traced alone, with the model
    called directly (no mechscope joining or padding code on the reference side)."""
    sites = ("heads", "patterns", "resid")
    out = tmp_path / "t" if streamed else None
    got = trace(tiny, RAGGED, sites=sites, batch_size=2, out_dir=out, progress=False)
    if streamed:
        got = open_trace(out)
    assert got.lengths.tolist() == [len(r) for r in RAGGED]
    for i, row in enumerate(RAGGED):
        n = len(row)
        assert got.tokens[i, :n].tolist() == row and (got.tokens[i, n:] == 0).all()  # right pad
        logits, cache = tiny.run_with_cache(torch.tensor([row]))
        for layer in range(2):
            torch.testing.assert_close(got.heads(layer)[i, :n], cache[f"blocks.{layer}.attn.hook_z"][0],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.resid(layer)[i, :n],
                                       cache[f"blocks.{layer}.hook_resid_post"][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.pattern(layer)[i, :, :n, :n],
                                       cache[f"blocks.{layer}.attn.hook_pattern"][0], atol=1e-5, rtol=1e-5)
            assert float(got.pattern(layer)[i, :, :n, n:].abs().sum()) == 0.0  # no attention to pads
        assert int(got.top_tokens[i, 0]) == int(logits[0, -1].argmax())


def test_streamed_trace_equals_in_memory(tiny, tmp_path):
    rows = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [12, 13, 14, 15], [3, 3]]
    memory = trace(tiny, rows, sites=("heads", "patterns", "ffn"), batch_size=2, progress=False)
    streamed = trace(
        tiny,
        rows,
        sites=("heads", "patterns", "ffn"),
        batch_size=2,
        out_dir=tmp_path / "t",
        progress=False,
    )
    assert streamed.meta["path"] == str(tmp_path / "t")
    back = open_trace(tmp_path / "t")
    assert len(list(iter_shards(tmp_path / "t"))) == 3
    assert back.shapes() == memory.shapes()
    for key in memory.tensors:
        torch.testing.assert_close(back.tensors[key], memory.tensors[key])
    torch.testing.assert_close(back.tokens, memory.tokens)
    # save/open round trip of an in-memory trace
    memory.save(tmp_path / "m")
    torch.testing.assert_close(open_trace(tmp_path / "m").ffn(1), memory.ffn(1))


def test_crashed_stream_leaves_nothing(tiny, tmp_path):
    calls = {"n": 0}

    def explode(act, hook):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    with (
        pytest.raises(RuntimeError, match="boom"),
        hooked(tiny, [("blocks.0.hook_resid_post", explode)]),
    ):
        trace(
            tiny,
            _tokens(n=4),
            sites=("heads",),
            batch_size=1,
            out_dir=tmp_path / "t",
            progress=False,
        )
    assert not (tmp_path / "t").exists()
    assert list(tmp_path.iterdir()) == []
    assert count_hooks(tiny) == 0
    with pytest.raises(StoreError, match="not a complete trace"):
        open_trace(tmp_path)


def test_hooks_are_removed_when_the_forward_raises(tiny):
    def explode(act, hook):
        raise ValueError("inside the forward")

    with (
        pytest.raises(ValueError),
        Tracer(tiny, sites=("heads",)) as tracer,
        hooked(tiny, [("blocks.1.hook_resid_post", explode)]),
    ):
        tracer.run(_tokens(), progress=False)
    assert count_hooks(tiny) == 0


def test_forward_outside_the_context_is_refused(tiny):
    tracer = Tracer(tiny, sites=("heads",))
    with pytest.raises(RuntimeError, match="context manager"):
        tracer.forward(_tokens())


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"sites": ("nope",)}, HookNameError, "unknown site"),
        ({"layers": (5,)}, HookNameError, "out of range"),
        ({"heads": (4,)}, HookNameError, "out of range"),
        ({"dtype": "int7"}, InputError, "unknown dtype"),
        ({"positions": ()}, InputError, "captures nothing"),
        ({"batch_size": 0}, InputError, "batch_size"),
    ],
)
def test_bad_config(tiny, kwargs, error, words):
    with pytest.raises(error, match=words):
        Tracer(
            tiny,
            TraceConfig(**{k: v for k, v in kwargs.items() if k != "layers" and k != "heads"}),
            **{k: v for k, v in kwargs.items() if k in ("layers", "heads")},
        )


def test_bad_inputs(tiny, tiny_attn):
    with pytest.raises(InputError, match="no tokenizer"):
        trace(tiny, "some text", progress=False)
    with pytest.raises(InputError, match="context is 32"):
        trace(tiny, _tokens(n=1, pos=40), progress=False)
    with pytest.raises(InputError, match="no prompt"):
        trace(tiny, [], progress=False)
    with pytest.raises(InputError, match="outside"):
        trace(tiny, torch.tensor([[1, 99]]), progress=False)
    with pytest.raises(InputError, match="integers"):
        trace(tiny, torch.tensor([[1.0, 2.0]]), progress=False)
    with pytest.raises(InputError, match="fall outside"):
        trace(tiny, [[1, 2]], positions=(5,), progress=False)
    with pytest.raises(HookNameError, match="attention-only"):
        Tracer(tiny_attn, sites=("ffn",))
    assert count_hooks(tiny) == 0


def test_nan_weights_are_reported(tiny):
    with torch.no_grad():
        tiny.blocks[0].attn.o.weight.fill_(float("nan"))
    with pytest.raises(InputError, match="NaN"):
        trace(tiny, _tokens(), progress=False)
    assert count_hooks(tiny) == 0


def test_unknown_hook_name_attaches_nothing(tiny):
    with (
        pytest.raises(HookNameError, match="Did you mean"),
        hooked(
            tiny,
            [
                ("blocks.0.attn.hook_z", lambda act, hook: None),
                ("blocks.0.attn.hook_zz", lambda act, hook: None),
            ],
        ),
    ):
        pass
    assert count_hooks(tiny) == 0


def test_attention_only_model_traces(tiny_attn):
    tr = trace(tiny_attn, _tokens(), sites=("heads", "resid"), progress=False)
    assert tr.resid(1).shape == (3, 7, 32)


def test_trace_folders_follow_the_umask(tiny, tmp_path):
    """A streamed trace gets the modes the umask gives (not mkdtemp's 0700, safetensors' 0600)."""
    import os

    old = os.umask(0o027)
    try:
        trace(tiny, _tokens(), sites=("resid",), out_dir=tmp_path / "t", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "t").stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "t").iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes


def test_an_unwritable_trace_folder_is_one_clear_error_before_any_forward(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot write a trace to"):
        trace(tiny, _tokens(), sites=("resid",), out_dir=blocker / "t", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
