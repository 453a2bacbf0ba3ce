"""Causal tracing (ROME) by its defining properties, against a plain one-forward-per-restore loop
written here independently, on tiny native models and the zoo's facts model."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mechscope.attribution.causal_trace import (
    CausalTraceConfig,
    aggregate_traces,
    causal_trace,
    prepare_trace,
    restore_probs,
    subject_embedding_std,
    window_layers,
)
from mechscope.attribution.causal_trace_result import CausalTraceResult
from mechscope.errors import HookNameError, InputError
from mechscope.kernels.noise import subject_noise
from mechscope.models import load
from mechscope.probes import Patch, Tracer, intervene
from mechscope.probes.hooks import hooked
from mechscope.store import Store

TINY = "native:n_layers=3,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=16,seed=1"
ATTN_ONLY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_vocab=50,n_ctx=16,attn_only=true"
ROOT = Path(__file__).resolve().parents[2]
PROMPT = [3, 17, 5, 9, 22, 41, 8]
SPAN = (1, 4)


@pytest.fixture(scope="module")
def tiny3():
    return load(TINY)


@pytest.fixture(scope="module")
def facts():
    from mechscope.models.zoo.data import facts_eval
    from mechscope.models.zoo.recipes import RECIPES

    batch = facts_eval(RECIPES["facts"], 4, seed=0)[-1]  # the longest subjects
    row = batch.clean[0]
    return load("zoo:facts"), row[: int(batch.answer_pos[0]) + 1], int(batch.answer[0])


def _gate(ours: torch.Tensor, peer: torch.Tensor) -> None:
    err = float((ours.double() - peer.double()).abs().max())
    assert err <= 1e-4 * float(peer.abs().max()) + 1e-5, err


def loop_trace(model, tokens, span, target, *, kind, window, samples, nu, seed, severed=None):
    """ROME's reference loop: one forward per (token, layer), the N noise samples as the batch."""
    tokens = torch.as_tensor(tokens)
    n_layers, n_pos = int(model.cfg.n_layers), len(tokens)
    noise = subject_noise(samples, span[1] - span[0], int(model.cfg.d_model), seed=seed)

    def corrupt(act, hook):
        out = act.clone()
        out[:, span[0] : span[1]] += nu * noise
        return out

    site = {"hidden": "resid", "mlp": "mlp_out", "attn": "attn_out"}[kind]
    sites = ("resid", "attn_out") if model.cfg.attn_only else ("resid", "attn_out", "mlp_out")
    with torch.no_grad(), Tracer(model, sites=sites) as tr:
        _, clean = tr.forward(tokens[None])
        with hooked(model, [("hook_embed", corrupt)]):
            _, noisy = tr.forward(tokens[None].repeat(samples, 1))
    out = torch.zeros(n_layers, n_pos, dtype=torch.float64)
    for layer in range(n_layers):
        layers = [layer] if kind == "hidden" else window_layers(layer, n_layers, window)
        for t in range(n_pos):
            specs = [Patch(site=site, layer=ly, positions=(t,), source=clean.get(site, ly))
                     for ly in layers]
            if severed:
                frozen = {"mlp": "mlp_out", "attn": "attn_out"}[severed]
                specs += [Patch(site=frozen, layer=ly, source=noisy.get(frozen, ly))
                          for ly in range(layer + 1, n_layers)]
            with torch.no_grad(), hooked(model, [("hook_embed", corrupt)]), intervene(model, specs):
                logits = model(tokens[None].repeat(samples, 1))
            out[layer, t] = torch.softmax(logits[:, -1].double(), -1)[:, target].mean()
    return out


# -- defining properties -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_no_noise_no_effect(tiny3, kind):
    r = causal_trace(tiny3, PROMPT, SPAN, kind=kind, noise=0.0, samples=3, progress=False)
    assert r.p_corrupt == r.p_clean
    assert bool((r.indirect_effect == 0).all())
    assert r.n_skipped == r.scores.numel()


def test_no_noise_no_effect_facts(facts):
    model, tokens, answer = facts
    r = causal_trace(model, tokens, (1, len(tokens) - 1), target=answer, noise=0.0, progress=False)
    assert r.p_corrupt == r.p_clean and bool((r.indirect_effect == 0).all())


def test_last_layer_last_token_restores_clean(tiny3, facts):
    r = causal_trace(tiny3, PROMPT, SPAN, samples=4, progress=False)
    assert r.total_effect != 0
    assert r.scores[-1, -1] == pytest.approx(r.p_clean, abs=1e-6)
    model, tokens, answer = facts
    r = causal_trace(model, tokens, (1, len(tokens) - 1), target=answer, samples=4, progress=False)
    assert r.total_effect > 0.1  # the noise destroys the memorised fact
    assert r.scores[-1, -1] == pytest.approx(r.p_clean, abs=1e-6)


def test_restoring_every_corrupted_position_at_layer_0(tiny3):
    """At the first block's output every position from the subject on is corrupted: restoring all
    of them gives the clean run; the positions before the subject are exact no-ops."""
    setup = prepare_trace(tiny3, PROMPT, SPAN, config=CausalTraceConfig(samples=4))
    every = ((("resid", 0, tuple(range(SPAN[0], len(PROMPT)))),), ())
    before = ((("resid", 0, tuple(range(SPAN[0]))),), ())
    (p_all, p_before), work = restore_probs(tiny3, setup, [every, before])
    assert p_all == pytest.approx(setup.p_clean, abs=1e-6)
    assert p_before == setup.p_corrupt and work["skipped"] == 1


def test_seed_determinism(tiny3):
    a = causal_trace(tiny3, PROMPT, SPAN, samples=3, seed=5, progress=False)
    b = causal_trace(tiny3, PROMPT, SPAN, samples=3, seed=5, progress=False)
    c = causal_trace(tiny3, PROMPT, SPAN, samples=3, seed=6, progress=False)
    assert torch.equal(a.scores, b.scores) and a.p_corrupt == b.p_corrupt
    assert not torch.equal(a.scores, c.scores) and a.p_corrupt != c.p_corrupt


@pytest.mark.parametrize(("kind", "window", "severed"),
                         [("hidden", 10, None), ("mlp", 3, None), ("attn", 2, None),
                          ("hidden", 10, "mlp"), ("hidden", 10, "attn")])  # fmt: skip
def test_batched_equals_loop(tiny3, kind, window, severed):
    cfg = dict(kind=kind, window=window, samples=3, noise=3.0, seed=2, severed=severed)
    # a tiny budget forces several chunks
    r = causal_trace(tiny3, PROMPT, SPAN, max_bytes=200_000, progress=False, **cfg)
    assert r.work["forwards"] > 2
    ref = loop_trace(tiny3, PROMPT, SPAN, r.target, kind=kind, window=window, samples=3,
                     nu=3.0 * r.sigma, seed=2, severed=severed)  # fmt: skip
    _gate(r.scores, ref)


def test_batched_equals_loop_facts(facts):
    model, tokens, answer = facts
    span = (1, len(tokens) - 1)
    for kind in ("hidden", "mlp"):
        r = causal_trace(model, tokens, span, target=answer, kind=kind, samples=5, progress=False)
        ref = loop_trace(model, tokens, span, answer, kind=kind, window=10, samples=5,
                         nu=3.0 * r.sigma, seed=0)  # fmt: skip
        _gate(r.scores, ref)


def test_severed_at_the_last_layer_is_plain_hidden(tiny3):
    plain = causal_trace(tiny3, PROMPT, SPAN, samples=3, progress=False)
    cut = causal_trace(tiny3, PROMPT, SPAN, samples=3, severed="mlp", progress=False)
    assert torch.equal(plain.scores[-1], cut.scores[-1])  # nothing above the last layer to freeze
    assert not torch.equal(plain.scores, cut.scores)


def test_window_arithmetic():
    assert window_layers(0, 12, 10) == (0, 1, 2, 3, 4)
    assert window_layers(5, 12, 10) == tuple(range(0, 10))
    assert window_layers(6, 12, 10) == tuple(range(1, 11))  # l-5 .. l+4
    assert window_layers(11, 12, 10) == (6, 7, 8, 9, 10, 11)
    assert window_layers(2, 4, 10) == (0, 1, 2, 3)
    assert window_layers(2, 6, 3) == (1, 2, 3)
    assert window_layers(2, 6, 1) == (2,)


def test_sigma_default_and_given(tiny3):
    w = tiny3.W_E.detach()
    r = causal_trace(tiny3, PROMPT, SPAN, samples=2, progress=False)
    assert r.sigma == pytest.approx(float(w.std()))
    s = subject_embedding_std(tiny3, [PROMPT[1:4]])
    assert s == pytest.approx(float(w[torch.tensor(PROMPT[1:4])].std()))
    r2 = causal_trace(tiny3, PROMPT, SPAN, samples=2, sigma=s, progress=False)
    assert r2.sigma == s


def test_default_target_is_top1(tiny3):
    logits = tiny3(torch.tensor([PROMPT]))
    r = causal_trace(tiny3, PROMPT, SPAN, samples=2, progress=False)
    assert r.target == int(logits[0, -1].argmax())
    r = causal_trace(tiny3, torch.tensor([PROMPT]), SPAN, target=7, samples=2, progress=False)
    assert r.target == 7


# -- inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "subject", "kw", "match"), [
    ([], (0, 1), {}, "no tokens"),
    ("   ", (0, 1), {}, "empty"),
    ("The Eiffel Tower", "Eiffel", {}, "no tokenizer"),
    (list(range(17)), (0, 1), {}, "context"),
    (PROMPT, (3, 3), {}, "span"),
    (PROMPT, (0, 8), {}, "span"),
    (PROMPT, "x", {}, "no tokenizer"),
    (PROMPT, SPAN, {"target": 50}, "one token"),
    (PROMPT, SPAN, {"target": " Paris"}, "no tokenizer"),
    (PROMPT, SPAN, {"kind": "resid"}, "kind"),
    (PROMPT, SPAN, {"samples": 0}, "samples"),
    (PROMPT, SPAN, {"window": 0}, "window"),
    (PROMPT, SPAN, {"noise": -1.0}, "noise"),
    (PROMPT, SPAN, {"sigma": 0.0}, "sigma"),
    (PROMPT, SPAN, {"severed": "mlp", "kind": "mlp"}, "kind='hidden'"),
    (torch.tensor([1.5, 2.0]), (0, 1), {}, "integer"),
])  # fmt: skip
def test_bad_inputs(tiny3, prompt, subject, kw, match):
    with pytest.raises(InputError, match=match):
        causal_trace(tiny3, prompt, subject, progress=False, **kw)


def test_subject_text_needs_match():
    """Subject lookup by text, with a stub tokenizer (one letter a token: 0 -> "a")."""

    class Tok:
        def decode(self, ids):
            return "".join(chr(97 + int(i)) for i in ids)

    model = load(TINY)
    model.tokenizer = Tok()
    r = causal_trace(model, PROMPT, "rfj", samples=2, progress=False)  # ids 17, 5, 9
    assert r.subject == SPAN
    with pytest.raises(InputError, match="not found in the prompt"):
        causal_trace(model, PROMPT, "xyz", progress=False)


def test_mlp_on_attention_only_model():
    model = load(ATTN_ONLY)
    with pytest.raises(HookNameError):
        causal_trace(model, PROMPT, SPAN, kind="mlp", progress=False)
    r = causal_trace(model, PROMPT, SPAN, kind="attn", samples=2, progress=False)
    assert r.scores.shape == (2, len(PROMPT))


# -- the result ----------------------------------------------------------------------------------


def test_result_frame_figure_store_and_aggregate(tiny3):
    r = causal_trace(tiny3, PROMPT, SPAN, samples=2, progress=False)
    frame = r.to_frame()
    assert len(frame) == 3 * len(PROMPT) and frame["subject"].sum() == 3 * 3
    assert frame["token"].tolist()[1].endswith("*")
    fig = r.figure()
    assert list(fig.data[0].x)[1].endswith("*")
    layer, pos = r.argmax()
    assert r.scores[layer, pos] == r.scores.max()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        assert CausalTraceResult.load(store, r.save(store)) == r
    r2 = causal_trace(tiny3, PROMPT[:5], (2, 3), samples=2, progress=False)
    agg = aggregate_traces([r, r2])
    assert agg.scores.shape == (6, 3) and agg.counts == (2, 1, 2, 2, 1, 2)
    ie = r.indirect_effect
    expected_first = (ie[:, 1] + r2.indirect_effect[:, 2]) / 2
    assert torch.allclose(agg.scores[0].double(), expected_first.double(), atol=1e-6)
    assert agg.to_frame().shape[0] == 18 and agg.figure() is not None
    with pytest.raises(InputError):
        aggregate_traces([r, causal_trace(tiny3, PROMPT, SPAN, kind="mlp", samples=2, progress=False)])


def test_benchmark_quick():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "causal_trace.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"gate": "pass"' in out.stdout
