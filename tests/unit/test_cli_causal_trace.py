"""`mechscope causal-trace`: a thin wrapper over causal_trace."""

from __future__ import annotations

import pytest
import torch

from mechscope.attribution import causal_trace
from mechscope.cli import main
from mechscope.models import load

TINY = "native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8"
PROMPT = "1,2,3,4,5"


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_json_gives_the_library_numbers(cli, kind):
    data = cli.json("causal-trace", TINY, "--prompt-tokens", PROMPT, "--subject-span", "1:3",
                 "--kind", kind, "--samples", "3", "--window", "2", "--seed", "1", "--json")
    ref = causal_trace(load(TINY), [1, 2, 3, 4, 5], (1, 3), kind=kind, samples=3, window=2,
                       seed=1, progress=False)
    assert torch.allclose(torch.tensor(data["scores"], dtype=torch.float64), ref.scores)
    assert torch.allclose(torch.tensor(data["indirect_effect"], dtype=torch.float64),
                          ref.indirect_effect)
    assert len(data["scores"]) == 2 and all(len(row) == 5 for row in data["scores"])
    assert data["tokens"] == ["1", "2", "3", "4", "5"] and data["subject"] == [1, 3]
    assert data["kind"] == kind and data["target"] == ref.target
    assert data["target_token"] == ref.target_token
    assert data["p_clean"] == pytest.approx(ref.p_clean)
    assert data["p_corrupt"] == pytest.approx(ref.p_corrupt)
    assert data["total_effect"] == pytest.approx(ref.p_clean - ref.p_corrupt)
    assert data["run_id"] is None


def test_target_severed_and_store(cli, tmp_path):
    from mechscope.attribution import CausalTraceResult
    from mechscope.store import Store

    data = cli.json("causal-trace", TINY, "--prompt-tokens", PROMPT, "--subject-span", "1:3",
                 "--target", "7", "--severed", "mlp", "--samples", "2", "--noise", "5",
                 "--store", str(tmp_path / "s"), "--json")
    assert data["target"] == 7 and data["severed"] == "mlp" and data["noise"] == 5.0
    saved = CausalTraceResult.load(Store(tmp_path / "s", readonly=True), data["run_id"])
    assert torch.allclose(saved.scores, torch.tensor(data["scores"], dtype=saved.scores.dtype))


def test_human_output_is_a_table(capsys):
    main(["causal-trace", TINY, "--prompt-tokens", PROMPT, "--subject-span", "1:3",
          "--samples", "2", "--top", "3"])
    out = capsys.readouterr().out
    assert "p_clean" not in out and "clean" in out and "corrupt" in out and "total effect" in out
    assert "indirect_effect" in out and "2*" in out
    assert len(out.strip().splitlines()) == 2 + 1 + 3  # header, caption, column names, 3 cells


def test_help(capsys):
    main(["causal-trace", "--help"])
    out = capsys.readouterr().out
    assert "--subject" in out and "--prompt-tokens" in out and "--severed" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--prompt-tokens", PROMPT, "--subject-span", "4:9"], "not a non-empty span"),
        (["--prompt-tokens", PROMPT, "--subject-span", "1:3", "--kind", "bogus"], "--kind"),
        (["--prompt-tokens", PROMPT, "--subject-span", "1:3", "--severed", "x"], "--severed"),
        (["--prompt-tokens", PROMPT, "--subject-span", "1:3", "--kind", "mlp", "--severed",
          "attn"], "--kind hidden only"),
        (["--prompt-tokens", PROMPT, "--subject-span", "1:3", "--target", "40"], "target"),
        (["--prompt-tokens", PROMPT, "--subject-span", "1:3", "--target", "x"], "token id"),
        (["--prompt-tokens", "", "--subject-span", "1:3"], "empty"),
        (["--prompt", "  ", "--subject", "a"], "prompt is empty"),
        (["--prompt", "hello world", "--subject", "hello"], "no tokenizer"),
        (["--prompt-tokens", PROMPT, "--subject", "2"], "--subject-span"),
        (["--prompt-tokens", PROMPT, "--subject-span", "a:b"], "START:END"),
        (["--subject-span", "1:3"], "give either --prompt"),
        (["--prompt-tokens", PROMPT], "give either --subject"),
        (["--prompt-tokens", "1,2,3,4,5,6,7,8,9", "--subject-span", "1:3"], "context"),
        (["--prompt-tokens", PROMPT, "--subject-span", "1:3", "--samples", "0"], "--samples"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli, tmp_path, argv, words):
    store = tmp_path / "s"
    code, out, err = cli.run("causal-trace", TINY, *argv, "--store", str(store))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not store.exists()


def test_unknown_model_spec(cli, tmp_path):
    code, out, err = cli.run("causal-trace", "no-such-model", "--prompt", "a b",
                          "--subject", "a", "--store", str(tmp_path / "s"))
    assert code == 2 and out == "" and "unknown model spec" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


class _Tok:
    """Just enough of a tokenizer for the CLI's text checks (one char = one token)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 11 for c in text]}

    def encode(self, text, add_special_tokens=False):
        return self(text)["input_ids"]

    def decode(self, ids):
        return "".join(chr(97 + int(i)) for i in ids)


def test_text_errors_with_a_tokenizer(cli, monkeypatch):
    """Subject not in the prompt and a multi-token target, on a model with a (toy) tokenizer."""
    import mechscope.models as models

    model = load(TINY)
    model.tokenizer = _Tok()
    monkeypatch.setattr(models, "load", lambda spec: model)
    code, out, err = cli.run("causal-trace", TINY, "--prompt-tokens", PROMPT,
                          "--subject", "zz")
    assert code == 2 and "subject 'zz' not found" in err and "--subject-span START:END" in err
    assert err.count("\n") == 1
    code, out, err = cli.run("causal-trace", TINY, "--prompt-tokens", PROMPT,
                          "--subject", "cd", "--target", "ab")
    assert code == 2 and "not a single token" in err and err.count("\n") == 1
