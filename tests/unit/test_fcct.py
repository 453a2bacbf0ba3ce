"""Fine-grained causal tracing (FCCT) by its defining properties, against a plain
one-forward-per-restore loop written here, on tiny native models."""

from __future__ import annotations

from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import torch

from mechscope.attribution.fcct import (
    FCCTResult,
    default_groups,
    fine_grained_trace,
    resolve_groups,
)
from mechscope.errors import HookNameError, InputError
from mechscope.kernels.noise import subject_noise
from mechscope.models import load
from mechscope.probes import Patch, Tracer, intervene
from mechscope.probes.hooks import hooked
from mechscope.store import Store

TINY = "native:n_layers=3,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=16,seed=1"
ATTN_ONLY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_vocab=50,n_ctx=16,attn_only=true"
PROMPT = [3, 17, 5, 9, 22, 41, 8]
SPAN = (2, 4)
SITES = {"attn": "attn_out", "mlp": "mlp_out", "hidden": "resid"}


@pytest.fixture(scope="module")
def tiny3():
    return load(TINY)


@pytest.fixture(scope="module")
def traced(tiny3):
    return fine_grained_trace(tiny3, PROMPT, SPAN, samples=3, progress=False)


def loop_fcct(model, tokens, span, groups, components, *, samples, nu, seed, target):
    """The reference: one forward (N noisy rows) per (component, group, layer), with Patch."""
    tokens = torch.as_tensor(tokens)
    noise = subject_noise(samples, span[1] - span[0], int(model.cfg.d_model), seed=seed)

    def corrupt(act, hook):
        out = act.clone()
        out[:, span[0] : span[1]] += nu * noise
        return out

    with torch.no_grad(), Tracer(model, sites=tuple(SITES[c] for c in components)) as tr:
        clean_logits, clean = tr.forward(tokens[None])
        with hooked(model, [("hook_embed", corrupt)]):
            noisy_logits = model(tokens[None].repeat(samples, 1))
    p_clean = torch.softmax(clean_logits[0, -1].double(), -1)[target]
    p_corrupt = torch.softmax(noisy_logits[:, -1].double(), -1)[:, target].mean()
    n_layers = int(model.cfg.n_layers)
    out = torch.zeros(len(components), len(groups), n_layers, dtype=torch.float64)
    for i, c in enumerate(components):
        for j, (s, e) in enumerate(groups.values()):
            for ly in range(n_layers):
                spec = Patch(site=SITES[c], layer=ly, positions=tuple(range(s, e)),
                             source=clean.get(SITES[c], ly))
                with torch.no_grad(), hooked(model, [("hook_embed", corrupt)]), intervene(model, [spec]):
                    logits = model(tokens[None].repeat(samples, 1))
                p = torch.softmax(logits[:, -1].double(), -1)[:, target].mean()
                out[i, j, ly] = (p - p_corrupt) / (p_clean - p_corrupt)
    return out


def test_shapes_and_default_groups(traced):
    assert traced.groups == {"early context": (0, 2), "segment": (2, 4), "late context": (4, 6),
                             "last token": (6, 7)}
    assert traced.components == ("attn", "mlp", "hidden")
    assert tuple(traced.scores.shape) == (3, 4, 3) == tuple(traced.p_patched.shape)
    assert traced.segment == SPAN and traced.total_effect != 0
    rr = (traced.p_patched - traced.p_corrupt) / (traced.p_clean - traced.p_corrupt)
    assert torch.equal(rr, traced.scores)


def test_matches_reference_loop(tiny3, traced):
    """attn and mlp (hidden: the properties below) at the groups that see the noise."""
    names = ("segment", "last token")
    groups = {g: traced.groups[g] for g in names}
    ref = loop_fcct(tiny3, PROMPT, SPAN, groups, ("attn", "mlp"), samples=3,
                    nu=traced.noise * traced.sigma, seed=0, target=traced.target)
    ours = traced.scores[:2, [traced.group_names.index(g) for g in names]]
    err = float((ours - ref).abs().max())
    assert err <= 1e-4 * float(ref.abs().max()) + 1e-5, err


def test_last_token_hidden_at_last_layer_recovers_everything(traced):
    assert traced.rr("hidden", "last token")[-1].item() == pytest.approx(1.0, abs=1e-6)
    assert traced.p_patched[2, 3, -1].item() == pytest.approx(traced.p_clean, abs=1e-7)


def test_groups_before_the_segment_are_exact_noops(traced):
    before = traced.scores[:, traced.group_names.index("early context")]
    assert bool((before == 0).all())
    assert traced.n_skipped >= before.numel()


def test_restoring_everything_from_the_segment_on(tiny3):
    """The hidden state at every corrupted position restores the clean run at any layer; the
    positions before the segment add nothing, so the two groups' RRs sum to 1."""
    r = fine_grained_trace(tiny3, PROMPT, SPAN, groups={"before": (0, 2), "from segment": (2, 7)},
                           components=("hidden",), samples=3, progress=False)
    assert torch.allclose(r.rr("hidden", "from segment"), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert bool((r.rr("hidden", "before") == 0).all())
    # restoring only part of the corrupted positions recovers less than everything at layer 0
    part = fine_grained_trace(tiny3, PROMPT, SPAN, groups={"segment": (2, 4)},
                              components=("hidden",), samples=3, progress=False)
    assert abs(part.rr("hidden", "segment")[0].item() - 1.0) > 1e-6


def test_no_noise_is_refused(tiny3):
    with pytest.raises(InputError, match="recovery rate is undefined.*noise="):
        fine_grained_trace(tiny3, PROMPT, SPAN, noise=0.0, samples=2, progress=False)


def test_deterministic_under_a_seed(tiny3, traced):
    again = fine_grained_trace(tiny3, PROMPT, SPAN, samples=3, progress=False)
    assert torch.equal(again.scores, traced.scores) and again.p_corrupt == traced.p_corrupt
    other = fine_grained_trace(tiny3, PROMPT, SPAN, samples=3, seed=1, progress=False)
    assert other.p_corrupt != traced.p_corrupt


def test_default_groups_split_and_edges():
    assert default_groups((2, 6), 8, split_segment=True) == {
        "early context": (0, 2), "segment first": (2, 3), "segment middle": (3, 5),
        "segment last": (5, 6), "late context": (6, 7), "last token": (7, 8)}
    assert default_groups((2, 4), 5) == {"early context": (0, 2), "segment": (2, 4),
                                         "last token": (4, 5)}
    assert default_groups((3, 4), 4) == {"early context": (0, 3), "last token": (3, 4)}
    with pytest.raises(InputError):
        default_groups((3, 3), 4)


@pytest.mark.parametrize(("groups", "match"), [
    ({"a": (0, 3), "b": (2, 5)}, "'a'.*'b'.*overlap"),
    ({"far": (5, 9)}, "'far'.*outside the prompt's 7 tokens"),
    ({"none": (3, 3)}, "'none'.*is empty"),
    ({"neg": (-1, 2)}, "'neg'.*outside"),
    ({"word": "Paris"}, "'word' is text but this model has no tokenizer"),
    ({}, "non-empty dict"),
])
def test_bad_groups(tiny3, groups, match):
    with pytest.raises(InputError, match=match):
        fine_grained_trace(tiny3, PROMPT, SPAN, groups=groups, samples=2, progress=False)


def test_text_groups_resolve_to_covering_tokens(tiny, monkeypatch):
    pieces = {1: "The", 2: " Eiffel", 3: " Tower", 4: " is", 5: " in"}
    model = tiny
    monkeypatch.setattr(model, "tokenizer", SimpleNamespace(decode=lambda ids: pieces[ids[0]]),
                        raising=False)
    tokens = torch.tensor([1, 2, 3, 4, 5])
    assert resolve_groups(model, tokens, {"subj": "Eiffel Tower", "verb": (3, 4)}) == {
        "subj": (1, 3), "verb": (3, 4)}
    with pytest.raises(InputError, match="'x': 'Louvre' not found in the prompt"):
        resolve_groups(model, tokens, {"x": "Louvre"})
    with pytest.raises(InputError, match="overlap"):
        resolve_groups(model, tokens, {"a": "Tower", "b": (2, 4)})


def test_bad_components_and_attention_only():
    model = load(ATTN_ONLY)
    with pytest.raises(HookNameError, match="attention-only"):
        fine_grained_trace(model, [1, 2, 3, 4], (1, 2), samples=2, progress=False)
    r = fine_grained_trace(model, [1, 2, 3, 4], (1, 2), components=("attn", "hidden"), samples=2,
                           progress=False)
    assert r.components == ("attn", "hidden") and tuple(r.scores.shape) == (2, 4, 2)
    with pytest.raises(InputError, match="components"):
        fine_grained_trace(model, [1, 2, 3, 4], (1, 2), components=("ffn",), progress=False)


def test_frame_and_figure(traced):
    frame = traced.to_frame()
    assert list(frame.columns) == ["component", "group", "layer", "rr", "p_patched"]
    assert len(frame) == traced.scores.numel()
    row = frame[(frame.component == "hidden") & (frame.group == "last token") & (frame.layer == 2)]
    assert float(row.rr.iloc[0]) == float(traced.scores[2, 3, 2])
    fig = traced.figure()
    assert isinstance(fig, go.Figure) and len(fig.data) == 3
    assert all(t.type == "heatmap" for t in fig.data)
    assert fig.layout.xaxis3.title.text == "layer" and fig.layout.yaxis.title.text == "group"
    assert [a.text for a in fig.layout.annotations] == ["attention output", "MLP output", "hidden state"]
    assert list(fig.data[0].x) == [0, 1, 2]
    assert [y.split(" ")[0] for y in fig.data[0].y] == ["early", "segment", "late", "last"]


def test_save_load_roundtrip(tmp_path, traced):
    store = Store(tmp_path)
    run_id = traced.save(store)
    back = FCCTResult.load(store, run_id)
    assert back == traced
    assert back.groups == traced.groups and back.group_names == traced.group_names
    assert store.get_run(run_id).kind == "fcct"
    assert len(store.table(run_id, "frame")) == traced.scores.numel()


def test_top_layers(traced):
    top = traced.top_layers("hidden", "last token", 2)
    rr = traced.rr("hidden", "last token")
    assert [ly for ly, _ in top] == torch.sort(rr, descending=True, stable=True).indices[:2].tolist()
    with pytest.raises(InputError, match="group 'nope'"):
        traced.rr("hidden", "nope")
