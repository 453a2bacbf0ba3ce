"""`mechscope heads retrieval|divergence|sinks`: thin wrappers over each module's default_run."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits import divergence, retrieval, sinks
from mechscope.models import load

ZOO = "zoo:retrieval"
TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32"


@pytest.fixture(scope="module")
def zoo():
    return load(ZOO)


@pytest.mark.parametrize("verb, module", [("retrieval", retrieval), ("divergence", divergence),
                                          ("sinks", sinks)])  # fmt: skip
def test_json_gives_the_library_numbers(cli, zoo, verb, module):
    data = cli.json("heads", verb, ZOO, "--n", "8", "--json")
    ref = module.default_run(zoo, n=8, progress=False).payload()
    assert data["model"] == ZOO and data["analysis"] == verb and data["run_id"] is None
    assert torch.allclose(torch.tensor(data["scores"]), torch.tensor(ref["scores"]))
    assert data["heads"] == ref["heads"]
    n_layers, n_heads = zoo.cfg.n_layers, zoo.cfg.n_heads
    assert len(data["scores"]) == n_layers and all(len(r) == n_heads for r in data["scores"])
    assert all(isinstance(h, list) and len(h) == 2 for h in data["heads"])


def test_zoo_retrieval_finds_its_copy_heads_in_every_verb(cli):
    """zoo:retrieval's ground-truth retrieval heads are L1H4 and L1H6 (ablation, ground truth v2)."""
    for verb in ("retrieval", "divergence"):
        data = cli.json("heads", verb, ZOO, "--json")
        assert sorted(map(tuple, data["heads"][:2])) == [(1, 4), (1, 6)], verb
    data = cli.json("heads", "sinks", ZOO, "--json")
    assert "sinks" in data and all("position" in s and "tokens" in s for s in data["sinks"])


def test_store_round_trip(cli, tmp_path):
    from mechscope.circuits import HeadDivergence
    from mechscope.store import Store

    data = cli.json("heads", "divergence", ZOO, "--tokens", "0,70,80,3,90,1,70",
                    "--segment-span", "1:3", "--mode", "delete", "--store", str(tmp_path / "s"),
                    "--json")  # fmt: skip
    saved = HeadDivergence.load(Store(tmp_path / "s", readonly=True), data["run_id"])
    assert saved.mode == "delete" and [list(s) for s in saved.spans] == [[1, 3]]
    assert torch.allclose(saved.scores, torch.tensor(data["scores"], dtype=saved.scores.dtype))


def test_human_output_lists_top_heads(capsys):
    from mechscope.cli import main

    main(["heads", "sinks", ZOO, "--top", "3"])
    out = capsys.readouterr().out
    assert "top 3 heads" in out and out.count("\n  L") >= 3 and "sink positions" in out


def test_path_option_says_which_path_ran_and_both_give_the_same_numbers(cli, capsys):
    by = {p: cli.json("heads", "sinks", ZOO, "--n", "4", "--path", p, "--json")
          for p in ("patterns", "stats")}  # fmt: skip
    assert by["patterns"]["attention_path"]["path"] == "patterns"
    assert by["stats"]["attention_path"]["path"] == "stats"
    assert torch.allclose(torch.tensor(by["patterns"]["scores"]), torch.tensor(by["stats"]["scores"]),
                          atol=1e-6)  # fmt: skip
    ret = {p: cli.json("heads", "retrieval", ZOO, "--n", "11", "--path", p, "--json")
           for p in ("patterns", "stats")}  # fmt: skip
    assert ret["stats"]["attention_path"]["path"] == "stats" and ret["stats"]["path"] == "engine"
    assert ret["patterns"]["scores"] == ret["stats"]["scores"]
    from mechscope.cli import main

    main(["heads", "sinks", ZOO, "--n", "4", "--path", "stats"])
    assert "attention path: stats (path='stats'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["heads", "retrieval", ZOO, "--task", "nope"], "unknown task 'nope'"),
        (["heads", "retrieval", ZOO, "--task", "induction"], "has no needle"),
        (["heads", "retrieval", ZOO, "--needle", "5"], "--needle goes with --prompt"),
        (["heads", "retrieval", ZOO, "--prompt", "hello"], "no tokenizer"),
        (["heads", "retrieval", ZOO, "--tokens", "0,1,2", "--needle", "7"], "does not occur"),
        (["heads", "retrieval", ZOO, "--tokens", "0,1,2"], "needs the needle"),
        (["heads", "retrieval", ZOO, "--tokens", "1,2", "--prompt", "x"], "not both"),
        (["heads", "divergence", ZOO, "--tokens", "0,5,6"], "--segment"),
        (["heads", "divergence", ZOO, "--tokens", "0,5,6", "--segment-span", "5:9"], "inside the prompt"),
        (["heads", "divergence", ZOO, "--segment", "x"], "go with --prompt"),
        (["heads", "divergence", ZOO, "--mode", "erase"], "--mode must be"),
        (["heads", "divergence", TINY], "no built-in prompts"),
        (["heads", "sinks", ZOO, "--tokens", ""], "at least one token"),
        (["heads", "sinks", ZOO, "--task", "ioi"], "unknown task"),
        (["heads", "sinks", "no-such-model"], "unknown model spec"),
        (["heads", "sinks", ZOO, "--path", "fast"], "unknown attention path 'fast'"),
        (["heads", "retrieval", ZOO, "--path", "eager"], "unknown attention path 'eager'"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, argv, words):
    code, out, err = cli.run(*argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
