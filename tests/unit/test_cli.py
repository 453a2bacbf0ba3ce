"""The command line: --json prints exactly one JSON object; bad input exits non-zero with one line."""

from __future__ import annotations

import json

import pytest

from mechscope.cli import main

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32"


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def _ok(capsys, *argv):
    main(list(argv))
    out = capsys.readouterr()
    return out.out, out.err


def test_models_json(capsys):
    out, _ = _ok(capsys, "models", "--json")
    data = json.loads(out)
    specs = {m["spec"]: m for m in data["models"]}
    assert specs["smollm2"]["n_heads"] == 9 and specs["smollm2"]["n_kv_heads"] == 3
    assert specs["minilm"]["n_layers"] == 6
    assert any(s.startswith("native:") for s in specs)


def test_trace_json_with_token_ids(capsys, tmp_path):
    out, _ = _ok(capsys, "trace", TINY, "--tokens", "1,2,3,4", "--tokens", "5,6",
                 "--sites", "heads,patterns", "--layers", "1", "--json", "--out", str(tmp_path / "t"))
    data = json.loads(out)
    assert data["shapes"] == {"heads.1": [2, 4, 4, 8], "patterns.1": [2, 4, 4, 4]}
    assert [p["n_tokens"] for p in data["predictions"]] == [4, 2]
    assert (tmp_path / "t" / "index.json").is_file()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["trace", "no-such-model", "--prompt", "x"], "unknown model spec"),
        (["trace", TINY, "--prompt", "text"], "no tokenizer"),
        (["trace", TINY, "--tokens", "1,2", "--sites", "bogus"], "unknown site"),
        (["trace", TINY, "--tokens", "1,x"], "comma-separated integers"),
        (["trace", TINY], "either --prompt"),
        (["trace", TINY, "--tokens", "1,2", "--layers", "9"], "out of range"),
        (["runs", "--store", "/nonexistent/store"], "not a mechscope store"),
        (["zoo", "train", "no-such-recipe", "--steps", "1"], "no-such-recipe"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, words):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err


def test_out_folder_that_exists_is_refused(capsys, tmp_path):
    code, _, err = _run(capsys, "trace", TINY, "--tokens", "1,2", "--out", str(tmp_path))
    assert code == 2 and "exists" in err


def test_demo_and_runs(capsys, tmp_path):
    store = tmp_path / "store"
    out, _ = _ok(capsys, "demo", "--model", TINY, "--store", str(store), "--json")
    summary = json.loads(out)
    assert len(summary["predictions"]) == 4
    out, _ = _ok(capsys, "runs", "--store", str(store), "--json")
    runs = json.loads(out)["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "complete"
    assert set(runs[0]["results"]) >= {"predictions", "head_norms", "trace_shapes"}


def test_zoo_list_json(capsys):
    out, _ = _ok(capsys, "zoo", "list", "--json")
    assert isinstance(json.loads(out)["zoo"], list)


def test_help_for_every_verb(capsys):
    for verb in (["models"], ["trace"], ["runs"], ["demo"], ["zoo", "list"], ["zoo", "train"]):
        main([*verb, "--help"])
        assert "Usage" in capsys.readouterr().out
