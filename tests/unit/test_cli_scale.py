"""The sweep options of the command line (--backend/--address/--workers/--shard-size), trace
--prompts-file, patch --task, causal-trace --facts and heads stats: each gives the library's
numbers; bad input is one line and status 2; an incomplete sweep is a failed run in the store."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.models import load

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32"
SMALL = "native:n_layers=2,d_model=16,n_heads=2,d_head=8,d_mlp=32,d_vocab=11,n_ctx=8"
FACTS = [{"prompt": [1, 2, 3, 4, 5], "subject": [1, 3]},
         {"prompt": [5, 6, 7], "subject": [0, 2], "target": 4},
         {"prompt": [2, 2, 9, 1], "subject": [2, 3]}]  # fmt: skip


class _Tok:
    """A toy tokenizer: one token per character."""

    pad_token_id = 0

    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


@pytest.fixture
def text_model(monkeypatch):
    """TINY with the toy tokenizer, returned by every ``load``."""
    import mechscope.models as models

    model = load(TINY)
    model.tokenizer = _Tok()
    model.to_tokens = lambda text, **_: torch.tensor([[1 + ord(c) % 48 for c in text]])
    monkeypatch.setattr(models, "load", lambda spec: model)
    return model


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in FACTS[:2]) + "\n\n" + json.dumps(FACTS[2]) + "\n")
    return path


# -- trace --------------------------------------------------------------------------------------


def test_trace_prompts_file_with_prompts_gives_the_library_trace(cli, text_model, tmp_path):
    from mechscope.probes import TraceConfig, open_trace, trace

    path = tmp_path / "prompts.txt"
    path.write_text("the cat\n\n   \nsat on the mat\r\n")
    data = cli.json("trace", "toy", "--prompt", "hello", "--prompts-file", str(path), "--layers", "1",
                    "--shard-size", "2", "--out", str(tmp_path / "t"), "--json")  # fmt: skip
    prompts = ["hello", "the cat", "sat on the mat"]
    assert [p["prompt"] for p in data["predictions"]] == prompts
    ref = trace(text_model, prompts, TraceConfig(sites=("heads", "patterns"), layers=(1,)), progress=False)
    assert [p["next_token_id"] for p in data["predictions"]] == ref.top_tokens[:, 0].tolist()
    assert [p["p"] for p in data["predictions"]] == pytest.approx(ref.top_logprobs[:, 0].exp().tolist())
    assert data["shapes"] == ref.shapes()
    saved = open_trace(tmp_path / "t")
    assert all(torch.equal(saved.tensors[k], v) for k, v in ref.tensors.items())


def test_trace_sharded_equals_local(cli, tmp_path):
    from mechscope.probes import open_trace, trace

    args = ["trace", TINY, "--tokens", "1,2,3,4", "--tokens", "5,6", "--tokens", "7,8,9", "--layers", "0"]
    cli.json(*args, "--shard-size", "1", "--out", str(tmp_path / "a"), "--json")
    sharded = open_trace(tmp_path / "a")
    ref = trace(load(TINY), [[1, 2, 3, 4], [5, 6], [7, 8, 9]], layers=(0,), progress=False)
    for key, value in ref.tensors.items():
        assert torch.equal(sharded.tensors[key], value), key


# -- patch --task -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_ioi():
    return load("zoo:ioi")


def test_patch_task_gives_the_library_numbers(cli, zoo_ioi):
    from mechscope.attribution import patch_sweep
    from mechscope.circuits.sae import task_batch

    batch = task_batch(zoo_ioi, "ioi", 8, 3)
    for extra, shard in (([], None), (["--shard-size", "4"], 4)):
        data = cli.json("patch", "zoo:ioi", "--task", "ioi", "--n", "8", "--seed", "3", *extra, "--json")
        ref = patch_sweep(zoo_ioi, batch, progress=False, shard_size=shard)
        assert torch.equal(torch.tensor(data["scores"], dtype=ref.scores.dtype), ref.scores)
        assert data["task"] == "ioi" and data["n_pairs"] == 8 and data["answer"] is None


def test_patch_task_induction_on_a_native_model(cli, capsys):
    from mechscope.attribution import patch_sweep
    from mechscope.cli_scale import task_pairs

    model = load(TINY)
    data = cli.json("patch", TINY, "--task", "induction", "--n", "4", "--site", "heads", "--by", "all",
                    "--json")  # fmt: skip
    ref = patch_sweep(model, task_pairs(model, "induction", 4, 0), site="heads", by="all",
                      progress=False)  # fmt: skip
    assert torch.equal(torch.tensor(data["scores"], dtype=ref.scores.dtype), ref.scores)
    from mechscope.cli import main

    main(["patch", TINY, "--task", "induction", "--n", "4", "--site", "heads", "--by", "all"])
    assert "on task induction (4 pairs)" in capsys.readouterr().out


# -- causal-trace --facts -----------------------------------------------------------------------


def test_causal_trace_facts_gives_the_library_sweep(cli, facts_file, tmp_path):
    from mechscope.attribution import CausalTraceSweep, causal_traces
    from mechscope.store import Store

    data = cli.json("causal-trace", SMALL, "--facts", str(facts_file), "--samples", "2",
                    "--shard-size", "2", "--store", str(tmp_path / "s"), "--json")  # fmt: skip
    facts = [{**f, "subject": tuple(f["subject"])} for f in FACTS]
    ref = causal_traces(load(SMALL), facts, samples=2, progress=False)
    assert data["n_facts"] == 3 and [t["line"] for t in data["traces"]] == [1, 2, 4]
    for got, want in zip(data["traces"], ref.traces, strict=True):
        assert torch.equal(torch.tensor(got["indirect_effect"], dtype=want.indirect_effect.dtype),
                           want.indirect_effect)  # fmt: skip
        assert got["target"] == want.target and got["subject"] == list(want.subject)
    assert data["traces"][1]["target"] == 4
    agg = torch.tensor([[float("nan") if v is None else v for v in row]
                        for row in data["aggregate"]["scores"]])  # fmt: skip
    assert torch.allclose(agg, ref.aggregate.scores, equal_nan=True)
    saved = CausalTraceSweep.load(Store(tmp_path / "s", readonly=True), data["run_id"])
    assert len(saved.traces) == 3 and torch.equal(saved.traces[0].scores, ref.traces[0].scores)


def test_causal_trace_facts_first_n_and_human_output(capsys, facts_file):
    from mechscope.cli import main

    main(["causal-trace", SMALL, "--facts", str(facts_file), "--n", "2", "--samples", "2"])
    out = capsys.readouterr().out
    assert out.startswith("causal traces of 2 facts (hidden, 2 samples")
    assert "last subject token" in out and "line 1 " in out and "line 2 " in out
    assert "line 4" not in out
    main(["causal-trace", SMALL, "--facts", str(facts_file), "--samples", "2", "--top", "1"])
    out = capsys.readouterr().out
    assert "first 1 of 3 facts (--json for all)" in out and "line 2" not in out


def test_known_facts_are_prompt_and_subject_with_the_model_s_answer():
    from mechscope.cli_scale import read_facts
    from mechscope.data import known_facts

    facts = read_facts("known", 3)
    assert facts == [{"prompt": f["prompt"], "subject": f["subject"], "target": None}
                     for f in known_facts("smollm2")[:3]]  # fmt: skip


# -- heads stats --------------------------------------------------------------------------------


def test_heads_stats_gives_the_library_numbers(cli, capsys, tmp_path):
    from mechscope.circuits import HeadStatistics
    from mechscope.circuits.head_stats import default_run
    from mechscope.cli import main
    from mechscope.store import Store

    model = load("zoo:induction")
    ref = default_run(model, n=4, progress=False, shard_size=2)
    data = cli.json("heads", "stats", "zoo:induction", "--task", "induction", "--n", "4",
                    "--shard-size", "2", "--store", str(tmp_path / "s"), "--json")  # fmt: skip
    for kind, grid in ref.scores.items():
        assert torch.equal(torch.tensor(data["by_kind"][kind], dtype=grid.dtype), grid), kind
    assert data["analysis"] == "stats" and data["n_prompts"] == 4
    saved = HeadStatistics.load(Store(tmp_path / "s", readonly=True), data["run_id"])
    assert torch.equal(saved.scores["induction"], ref.scores["induction"])
    main(["heads", "stats", "zoo:induction", "--tokens", "0,5,6,7,5,6,7", "--top", "2"])
    out = capsys.readouterr().out
    assert "over 1 prompt," in out and "  induction " in out
    assert [line.split()[0] for line in out.splitlines()[1:]] == list(ref.scores)
    assert all(line.count(" L") == 2 for line in out.splitlines()[1:])


# -- bad input, help ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["trace", TINY, "--tokens", "1,2", "--backend", "spark"], "--backend must be local or ray"),
        (["trace", TINY, "--tokens", "1,2", "--backend", "local", "--address", "10.0.0.1:6379"],
         "drop --backend local"),
        (["patch", "zoo:ioi", "--task", "ioi", "--workers", "2"], "add --backend ray"),
        (["patch", "zoo:ioi", "--task", "ioi", "--shard-size", "0"], "--shard-size"),
        (["patch", "zoo:ioi", "--task", "ioi", "--clean-tokens", "1,2"], "drop --clean-tokens"),
        (["patch", "zoo:ioi", "--task", "ioi", "--method", "attribution", "--backend", "ray"],
         "use --method exact"),
        (["patch", "zoo:ioi", "--task", "nope"], "unknown task 'nope'"),
        (["patch", "zoo:ioi", "--task", "induction"], "run it with --task ioi"),
        (["patch", TINY, "--task", "ioi"], "use --task induction"),
        (["patch", TINY, "--clean-tokens", "1,2", "--corrupt-tokens", "1,3", "--n", "4"],
         "go with --task"),
        (["causal-trace", SMALL, "--facts", "/no/such/facts.jsonl"], "no such file"),
        (["causal-trace", SMALL, "--facts", "known", "--prompt-tokens", "1,2"], "drop --prompt-tokens"),
        (["causal-trace", SMALL, "--facts", "known"], "no tokenizer"),
        (["causal-trace", SMALL, "--prompt-tokens", "1,2,3", "--subject-span", "0:1", "--backend",
          "ray"], "add --facts"),
        (["causal-trace", SMALL, "--prompt-tokens", "1,2,3", "--subject-span", "0:1", "--n", "2"],
         "goes with --facts"),
        (["trace", TINY, "--prompts-file", "/no/such/prompts.txt"], "does not exist"),
        (["heads", "stats", "zoo:induction", "--task", "ioi"], "--task induction"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, argv, words):
    code, out, err = cli.run(*argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("line, words", [
    ('{"prompt": [1, 2, 3], "subject": [0, 1]}\n{"prompt": [1, 2], subject: [0, 1]}', "line 2 is not JSON"),
    ('\n\n["a", "b"]', "line 3: expected a JSON object"),
    ('{"prompt": [1, 2, 3]}', "line 1: no 'subject'"),
    ('{"prompt": [1, 2, 3], "subject": [2, 7]}', "line 1: the subject span [2, 7] is not inside"),
    ('{"prompt": "Paris is in", "subject": "Rome"}', "line 1: the subject 'Rome' is not in the prompt"),
    ('\n  \n', "has no facts"),
])  # fmt: skip
def test_bad_facts_name_their_line(cli, tmp_path, line, words):
    path = tmp_path / "facts.jsonl"
    path.write_text(line + "\n")
    code, out, err = cli.run("causal-trace", SMALL, "--facts", str(path))
    assert code == 2 and words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, options", [
    (["trace"], ["--prompts-file", "--backend", "--address", "--workers", "--shard-size"]),
    (["patch"], ["--task", "--n", "--seed", "--backend", "--address", "--workers", "--shard-size"]),
    (["causal-trace"], ["--facts", "--n", "--backend", "--address", "--workers", "--shard-size"]),
    (["heads", "stats"], ["--prompt", "--tokens", "--task", "--backend", "--workers", "--store"]),
])  # fmt: skip
def test_help_lists_the_options(capsys, argv, options):
    from mechscope.cli import main

    main([*argv, "--help"])
    out = capsys.readouterr().out
    assert all(o in out for o in options), [o for o in options if o not in out]


# -- incomplete sweeps, Ray ---------------------------------------------------------------------


def test_incomplete_sweep_with_store_is_a_failed_run_with_the_report(cli, monkeypatch, tmp_path):
    import mechscope.attribution as attribution
    from mechscope.scale import ShardFailure, SweepIncomplete
    from mechscope.store import Store

    def failing(model, batch, **kwargs):
        raise SweepIncomplete("patch sweep", [ShardFailure(1, 4, 4, 3, "RuntimeError: boom")],
                              {0: None}, 2)  # fmt: skip

    monkeypatch.setattr(attribution, "patch_sweep", failing)
    code, out, err = cli.run("patch", "zoo:ioi", "--task", "ioi", "--n", "8", "--shard-size", "4",
                             "--store", str(tmp_path / "s"))  # fmt: skip
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "incomplete sweep" in err and "boom" in err and "recorded as failed run" in err
    runs = Store(tmp_path / "s", readonly=True).runs()
    assert len(runs) == 1 and runs[0].status == "failed" and runs[0].kind == "patch_sweep"
    assert "shard 1 (items 4-7) failed 3 time(s): RuntimeError: boom" in (runs[0].error or "")
    assert runs[0].config["shard_size"] == 4 and runs[0].config["task"] == "ioi"
    assert runs[0].id in err
    code, _, err = cli.run("patch", "zoo:ioi", "--task", "ioi", "--n", "8")  # no store: just the error
    assert code == 2 and "boom" in err and "recorded" not in err


def test_ray_backend_gives_the_local_numbers(cli, ray_cluster):
    args = ["patch", "zoo:ioi", "--task", "ioi", "--n", "8", "--shard-size", "4", "--json"]
    local = cli.json(*args)
    distributed = cli.json(*args, "--backend", "ray", "--workers", "2")
    assert distributed["scores"] == local["scores"]
    assert distributed["metric_clean"] == local["metric_clean"]
