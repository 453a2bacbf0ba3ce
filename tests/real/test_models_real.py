"""Real-model tier: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, installed from PyPI."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mechscope.cli import main
from mechscope.models import describe, load
from mechscope.probes import Tracer, count_hooks, hooked, open_trace, trace


def test_smollm2_knows_paris(smollm2):
    tokens = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        logits = smollm2(tokens)
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    info = describe(smollm2)
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head) == (30, 9, 3, 64)


def test_smollm2_trace_shapes(smollm2):
    prompts = ["The capital of France is", "Hello there"]
    tr = trace(smollm2, prompts, sites=("heads", "patterns", "ffn", "head_resid"),
               layers=(0, 29), progress=False)
    n = int(tr.lengths.max())
    assert tr.heads(0).shape == (2, n, 9, 64)
    assert tr.pattern(29).shape == (2, 9, n, n)
    assert tr.ffn(0).shape == (2, n, 1536)
    assert tr.head_resid(29).shape == (2, n, 9, 576)
    assert smollm2.tokenizer.decode(tr.top_tokens[0, :1]) == " Paris"
    # patterns of the real rows are distributions
    p = tr.pattern(29)[0, :, : tr.lengths[0], : tr.lengths[0]]
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-4, rtol=0)


def test_smollm2_head_resid_sums_to_attn_out(smollm2):
    tr = trace(smollm2, "The capital of France is", sites=("head_resid", "attn_out"), layers=(7,),
               progress=False)
    torch.testing.assert_close(tr.head_resid(7).sum(2), tr.attn_out(7), atol=1e-4, rtol=1e-4)


def test_smollm2_self_patch_is_a_no_op(smollm2):
    tokens = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        clean = smollm2(tokens)
    tr = trace(smollm2, tokens, sites=("heads", "ffn"), layers=(3, 20), progress=False)
    hooks = [(f"blocks.{layer}.attn.hook_z", (lambda v: lambda act, hook: v)(tr.heads(layer)))
             for layer in (3, 20)]
    hooks += [(f"blocks.{layer}.mlp.hook_post", (lambda v: lambda act, hook: v)(tr.ffn(layer)))
              for layer in (3, 20)]
    with torch.no_grad(), hooked(smollm2, hooks):
        patched = smollm2(tokens)
    torch.testing.assert_close(patched, clean)
    assert count_hooks(smollm2) == 0


def test_smollm2_streamed_equals_memory(smollm2, tmp_path):
    prompts = ["The capital of France is", "one two three", "Paris is in", "a b c d e f g h"]
    with Tracer(smollm2, sites=("heads",), layers=(5,), batch_size=3) as tracer:
        memory = tracer.run(prompts, progress=False)
        tracer.run(prompts, out_dir=tmp_path / "t", progress=False)
    back = open_trace(tmp_path / "t")
    for i, n in enumerate(memory.lengths.tolist()):
        torch.testing.assert_close(back.heads(5)[i, :n], memory.heads(5)[i, :n], atol=1e-5, rtol=1e-5)


def test_minilm_loads_and_its_patterns_trace(minilm):
    tr = trace(minilm, ["The cat sat on the mat", "Hello"], sites=("patterns", "heads", "resid"),
               progress=False)
    n = int(tr.lengths.max())
    assert tr.pattern(0).shape == (2, 12, n, n)
    assert tr.heads(5).shape == (2, n, 12, 32)
    # bidirectional: the first token attends to later ones
    assert float(tr.pattern(0)[0, :, 0, 1:].sum()) > 0
    row = tr.pattern(3)[0]
    torch.testing.assert_close(row.sum(-1), torch.ones(row.shape[:-1]), atol=1e-4, rtol=0)
    # padding is masked: the short prompt alone gives the same activations
    alone = trace(minilm, "Hello", sites=("resid",), progress=False)
    k = int(tr.lengths[1])
    torch.testing.assert_close(tr.resid(5)[1, :k], alone.resid(5)[0], atol=1e-4, rtol=1e-4)


def test_cli_trace_smollm2_json(capsys):
    main(["trace", "smollm2", "--prompt", "The capital of France is", "--sites", "heads,patterns",
          "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["predictions"][0]["next_token"] == " Paris"
    assert data["shapes"]["heads.0"] == [1, 6, 9, 64]
    assert data["shapes"]["patterns.29"] == [1, 9, 6, 6]


def test_cli_demo_on_smollm2(capsys, tmp_path):
    main(["demo", "--store", str(tmp_path / "store"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["predictions"][0]["top1"] == " Paris"
    sae = summary["heads"]["sae_circuit"]  # discrete-SAE circuit on IOI minimal pairs
    assert "skipped" not in sae and sae["task"] == "ioi" and len(sae["heads"]) > 0
    main(["runs", "--store", str(tmp_path / "store"), "--json"])
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert runs[0]["status"] == "complete" and runs[0]["model_spec"] == "smollm2"


def test_second_load_uses_the_cache():
    from mechscope.models.smollm2 import converted_dir

    folder = converted_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "mechscope-complete").is_file()
    again = load("smollm2")
    assert again.cfg.n_layers == 30


def _no_forward_calls():
    """A counter of module forwards (any module), and the hook's handle to remove."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__))
    return calls, handle


def _check_over_long_prompt(model, name, prompt):
    """The tracer refuses a prompt longer than the model's context with a clear error, before
    running the model (no silent truncation); the CLI (its own process: loading MiniLM attaches
    the bridge's own hooks, which the leak check would count) prints it as one line, status 2."""
    import subprocess
    import sys

    from mechscope.errors import InputError

    too_long = re.compile(r"too long|context is \d+|longer than", re.IGNORECASE)
    assert len(model.tokenizer(prompt)["input_ids"]) > model.cfg.n_ctx
    calls, handle = _no_forward_calls()
    try:
        with pytest.raises(InputError, match=too_long) as info:
            trace(model, prompt, sites=("heads",), progress=False)
    finally:
        handle.remove()
    assert calls == [], f"the model ran before the error: {calls[:5]}"
    assert str(model.cfg.n_ctx) in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "mechscope.cli", "trace", name, "--prompt", prompt],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert too_long.search(proc.stderr) and str(model.cfg.n_ctx) in proc.stderr


def test_over_long_prompt_fails_fast_on_minilm(minilm):
    _check_over_long_prompt(minilm, "minilm", "word " * 650)  # > 512 tokens


def test_over_long_prompt_fails_fast_on_smollm2(smollm2):
    _check_over_long_prompt(smollm2, "smollm2", "word " * 9000)  # > 8192 tokens
