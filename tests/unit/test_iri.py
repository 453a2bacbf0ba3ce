"""Representation injection (IRI) by its defining properties: lambda 0 is the identity bit for bit,
injected outputs keep their norms, only sources below a target contribute, the plan follows the
trace's recovery rates, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from mechscope.attribution.fcct import FCCTResult, fine_grained_trace
from mechscope.attribution.iri import (
    InjectionSpec,
    IRIPlan,
    evaluate_iri,
    inject,
    iri_plan,
)
from mechscope.errors import HookNameError, InputError
from mechscope.models import load
from mechscope.probes import Apply, Tracer, intervene
from mechscope.probes.hooks import count_hooks
from mechscope.results import Provenance

TINY = "native:n_layers=3,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=16,seed=1"
TOKENS = torch.tensor([[3, 17, 5, 9, 22, 41, 8], [4, 4, 30, 2, 11, 7, 19]])


@pytest.fixture(scope="module")
def tiny3():
    return load(TINY)


def _plan(attn=None, mlp=None, n_layers=3):
    def spec(site, s):
        return None if s is None else InjectionSpec(site=site, sources=s[0], weights=s[1],
                                                    targets=s[2], strength=s[3])
    return IRIPlan(n_layers=n_layers, attn=spec("attn_out", attn), mlp=spec("mlp_out", mlp))


def _fake_result(rr_attn, rr_mlp=None, groups=("segment", "last token")):
    """An FCCTResult with chosen RRs at the last-token group (the other groups zero)."""
    comps = ("attn",) if rr_mlp is None else ("attn", "mlp")
    n = len(rr_attn)
    scores = torch.zeros(len(comps), len(groups), n, dtype=torch.float64)
    scores[0, -1] = torch.tensor(rr_attn, dtype=torch.float64)
    if rr_mlp is not None:
        scores[1, -1] = torch.tensor(rr_mlp, dtype=torch.float64)
    return FCCTResult(provenance=Provenance.of(None), scores=scores, p_patched=scores.clone(),
                      components=comps, groups={g: (i, i + 1) for i, g in enumerate(groups)},
                      tokens=tuple(str(i) for i in range(len(groups))), segment=(0, 1), target=0,
                      p_clean=1.0, p_corrupt=0.0)


def _run(model, plan, tokens=TOKENS, **kw):
    """Logits, the values of attn_out/mlp_out before the injection (an outer recorder: writers
    run in attach order) and after it (a tracer: readers run after every writer)."""
    n = int(model.cfg.n_layers)
    pre: dict[str, torch.Tensor] = {}

    def recorder(key):
        def fn(act):
            pre[key] = act.clone()
            return act
        return fn

    rec = [Apply(site=s, layer=ly, fn=recorder(f"{s}.{ly}")) for s in ("attn_out", "mlp_out")
           for ly in range(n)]
    with torch.no_grad(), intervene(model, rec), inject(model, plan, **kw), \
            Tracer(model, sites=("attn_out", "mlp_out")) as tr:
        logits, trace = tr.forward(tokens)
    post = {f"{s}.{ly}": trace.get(s, ly) for s in ("attn_out", "mlp_out") for ly in range(n)}
    return logits, pre, post


def _expected(pre, site, layer, sources, lam, pos=-1):
    a = pre[f"{site}.{layer}"][:, pos]
    new = a + lam * sum(w * pre[f"{site}.{k}"][:, pos] for k, w in sources)
    return new * a.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True)


def test_lambda_zero_is_the_identity(tiny3):
    with torch.no_grad():
        base = tiny3(TOKENS)
        plan = _plan(attn=((0, 1), (0.9, 0.5), (1, 2), 0.0), mlp=((0,), (0.7,), (1, 2), 0.0))
        with inject(tiny3, plan):
            assert count_hooks(tiny3) == 0  # nothing to attach
            same = tiny3(TOKENS)
    assert torch.equal(same, base)


def test_lambda_zero_from_a_trace_is_the_identity(tiny3):
    r = fine_grained_trace(tiny3, TOKENS[0], (2, 4), components=("attn", "mlp"), samples=2,
                           progress=False)
    plan = iri_plan(r, k1=2, k2=2, lambda_a=0.0, lambda_m=0.0)
    with torch.no_grad():
        base = tiny3(TOKENS)
        with inject(tiny3, plan):
            same = tiny3(TOKENS)
    assert torch.equal(same, base)


def test_injection_keeps_norms_and_follows_the_formula(tiny3):
    plan = _plan(attn=((0, 1), (0.9, -0.4), (1, 2), 0.5), mlp=((0,), (0.7,), (1, 2), 0.3))
    logits, pre, post = _run(tiny3, plan)
    for site, spec in (("attn_out", plan.attn), ("mlp_out", plan.mlp)):
        for layer in range(3):
            key = f"{site}.{layer}"
            # every position but the last is untouched bit for bit
            assert torch.equal(post[key][:, :-1], pre[key][:, :-1])
            if layer not in spec.targets:
                assert torch.equal(post[key], pre[key])
                continue
            assert not torch.equal(post[key][:, -1], pre[key][:, -1])
            torch.testing.assert_close(post[key][:, -1].norm(dim=-1), pre[key][:, -1].norm(dim=-1),
                                       rtol=1e-6, atol=1e-6)
            want = _expected(pre, site, layer, spec.sources_below(layer), spec.strength)
            torch.testing.assert_close(post[key][:, -1], want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.equal(logits[:, -1], tiny3(TOKENS)[:, -1])


def test_only_sources_below_the_target_contribute(tiny3):
    # target 1 sees source 0, never source 2 (above) nor itself
    plan = _plan(attn=((0, 1, 2), (0.8, 5.0, 5.0), (1,), 0.7))
    _, pre, post = _run(tiny3, plan)
    want = _expected(pre, "attn_out", 1, [(0, 0.8)], 0.7)
    torch.testing.assert_close(post["attn_out.1"][:, -1], want, rtol=1e-5, atol=1e-6)
    # no source below any target: the forward is unchanged bit for bit
    plan = _plan(attn=((1, 2), (0.8, 0.9), (0, 1), 0.7))
    with torch.no_grad():
        base = tiny3(TOKENS)
        with inject(tiny3, plan):
            assert torch.equal(tiny3(TOKENS), base)


def test_right_padded_rows_inject_at_their_last_real_token(tiny3):
    plan = _plan(attn=((0,), (0.9,), (1, 2), 0.5), mlp=((0,), (0.7,), (1, 2), 0.3))
    short = TOKENS[1, :5]
    padded = torch.stack([TOKENS[0], torch.cat([short, torch.zeros(2, dtype=torch.long)])])
    lengths = torch.tensor([7, 5])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    with torch.no_grad():
        with inject(tiny3, plan, lengths=lengths):
            both = tiny3(padded, attention_mask=mask)
        with inject(tiny3, plan):
            alone0 = tiny3(TOKENS[:1])
            alone1 = tiny3(short[None])
        with inject(tiny3, plan, position=torch.tensor([6, 4])):
            by_pos = tiny3(padded, attention_mask=mask)
    torch.testing.assert_close(both[0], alone0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1, :5], alone1[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(by_pos, both)


def test_hooks_are_removed_on_error(tiny3):
    plan = _plan(attn=((0,), (0.9,), (1, 2), 0.5))
    with pytest.raises(RuntimeError, match="boom"), inject(tiny3, plan):
        assert count_hooks(tiny3) > 0
        raise RuntimeError("boom")
    assert count_hooks(tiny3) == 0


def test_plan_picks_top_layers_and_the_targets_after_the_earliest():
    rr_attn = [0.0, 0.1, 0.5, 0.05, 0.9, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    rr_mlp = [0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.25]
    plan = iri_plan(_fake_result(rr_attn, rr_mlp), k1=3, k2=4, lambda_a=0.26, lambda_m=0.16)
    assert plan.attn is not None and plan.mlp is not None and plan.n_layers == 12
    assert plan.attn.sources == (4, 5, 2) and plan.attn.weights == (0.9, 0.7, 0.5)
    assert plan.attn.targets == (3, 4, 5, 6) and plan.attn.strength == 0.26
    assert plan.mlp.sources == (0, 11, 10) and plan.mlp.targets == (1, 2, 3, 4)
    assert plan.mlp.strength == 0.16
    # k2 is clipped to the model; the defaults are the paper's
    plan = iri_plan(_fake_result(rr_attn))
    assert plan.mlp is None and plan.attn.targets == tuple(range(3, 12))
    assert plan.attn.strength == 0.26 and len(plan.attn.sources) == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k1": 0}, "k1 must be an int >= 1"),
    ({"k2": 0}, "k2 must be an int >= 1"),
    ({"lambda_a": -0.1}, "lambda_a must be a finite number >= 0"),
    ({"lambda_m": float("nan")}, "lambda_m must be a finite number >= 0"),
    ({"group": "question"}, "group 'question' is not in the trace"),
    ({"components": ("attn", "mlp")}, r"no \['mlp'\] component"),
    ({"components": ("hidden",)}, "components must be"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(InputError, match=match):
        iri_plan(_fake_result([0.1, 0.5, 0.2]), **kwargs)


def test_plan_with_no_layer_above_the_sources():
    with pytest.raises(InputError, match="no layer above"):
        iri_plan(_fake_result([0.0, 0.1, 0.9]), k1=1)


def test_bad_injections(tiny3, tiny_attn):
    with pytest.raises(InputError, match="outside the model's 3 layers"):
        _plan(attn=((0,), (1.0,), (3,), 0.5))
    with pytest.raises(InputError, match="one finite number per source"):
        _plan(attn=((0, 1), (1.0,), (2,), 0.5))
    with pytest.raises(InputError, match="strength must be"):
        _plan(attn=((0,), (1.0,), (2,), -1.0))
    with pytest.raises(InputError, match="needs an attention or an MLP"):
        IRIPlan(n_layers=3)
    with pytest.raises(InputError, match="plan is for a model of 3 layers"), \
            inject(load("native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=16"),
                   _plan(attn=((0,), (1.0,), (1,), 0.5))):
        pass
    with pytest.raises(HookNameError, match="attention-only"), \
            inject(tiny_attn, _plan(mlp=((0,), (1.0,), (1,), 0.5), n_layers=2)):
        pass
    with pytest.raises(InputError, match="lengths= .* or position=, not both"), \
            inject(tiny3, _plan(attn=((0,), (1.0,), (1,), 0.5)), position=0,
                   lengths=torch.tensor([3])):
        pass


def test_evaluate_on_prompt_pairs(tiny3):
    pairs = [([3, 17, 5, 9, 22], 8), ([4, 4, 30], 19), (torch.tensor([1, 2, 3, 4]), 5)]
    zero = _plan(attn=((0,), (0.9,), (1, 2), 0.0))
    ev = evaluate_iri(tiny3, zero, pairs)
    assert ev.n == 3 and ev.difference == 0.0 and ev.base == ev.injected
    assert ev.accuracy_base == ev.accuracy_injected
    with torch.no_grad():
        want = sum(float(torch.softmax(tiny3(torch.as_tensor(p)[None])[0, -1].double(), -1)[t])
                   for p, t in pairs) / 3
    assert ev.base == pytest.approx(want, abs=1e-6)
    ev = evaluate_iri(tiny3, _plan(attn=((0,), (0.9,), (1, 2), 2.0)), pairs, batch_size=2)
    assert ev.injected != ev.base and ev.difference == pytest.approx(ev.injected - ev.base)
    with pytest.raises(InputError, match="logit_diff"):
        evaluate_iri(tiny3, zero, pairs, metric="logit_diff")


def test_evaluate_on_a_task_batch(tiny, toy_task):
    task = toy_task(0)
    plan = _plan(attn=((0,), (0.9,), (1,), 1.0), n_layers=2)
    ev = evaluate_iri(tiny, plan, task, metric="logit_diff")
    with torch.no_grad():
        base = float(task.logit_diff(tiny(task.clean)).double().mean())
        with inject(tiny, plan):
            injected = float(task.logit_diff(tiny(task.clean)).double().mean())
    assert ev.base == pytest.approx(base, abs=1e-5)
    assert ev.injected == pytest.approx(injected, abs=1e-5)
    assert ev.metric == "logit_diff" and ev.n == 3
