"""The command line: --json prints exactly one JSON object; bad input exits non-zero with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mechscope.cli import main

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32"


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
def test_bad_input_exits_2_with_one_line(cli, argv, words):
    code, out, err = cli.run(*argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err


def test_out_folder_that_exists_is_refused(cli, tmp_path):
    code, _, err = cli.run("trace", TINY, "--tokens", "1,2", "--out", str(tmp_path))
    assert code == 2 and "exists" in err


def test_demo_and_runs(capsys, tmp_path):
    store = tmp_path / "store"
    out, _ = _ok(capsys, "demo", "--model", TINY, "--store", str(store), "--json")
    summary = json.loads(out)
    assert len(summary["predictions"]) == 4
    out, _ = _ok(capsys, "runs", "--store", str(store), "--json")
    runs = json.loads(out)["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "complete"
    assert set(runs[0]["results"]) >= {"predictions", "head_norms", "trace_shapes", "tokens",
                                       "patterns_prompt0", "patterns_prompt3",
                                       "causal_trace.result", "causal_trace_summary",
                                       "patching.result", "patching_summary"}
    # every analysis is a Result staged in the run, loadable by name
    from mechscope.results import Result, stored_results
    from mechscope.store import Store

    ro = Store(store, readonly=True)
    staged = stored_results(ro, summary["run_id"])
    assert {"causal_trace", "patching", "sinks"} <= set(staged)
    assert Result.load(ro, summary["run_id"], "causal_trace").trace_kind == "hidden"
    # the report is written and the summary says where; the human output says how to open it
    assert Path(summary["report"]).is_file() and summary["report"].endswith(".html")
    ct, pa = summary["causal_trace"], summary["patching"]
    assert ct["kind"] == "hidden" and ct["subject"] == [1, 3] and ct["samples"] == 3
    assert 0.0 <= ct["p_corrupt"] <= 1.0 and 0.0 <= ct["p_clean"] <= 1.0
    assert pa["site"] == "resid_pre" and pa["answer"] != pa["wrong"]
    assert {"layer", "pos", "token", "score"} <= set(pa["peak"])
    # the SAE circuit step cannot run on a random model without a task: skipped, with the reason
    assert "no tokenizer" in summary["heads"]["sae_circuit"]["skipped"]


def test_demo_on_a_zoo_model_scores_against_its_ground_truth(capsys, tmp_path):
    """On a zoo model the demo runs on the model's own minimal pairs and scores the circuit
    methods against the zoo truth; causal tracing (which needs a subject) is skipped, saying
    why; the report and the dashboard command are printed."""
    store = tmp_path / "store"
    out, _ = _ok(capsys, "demo", "--model", "zoo:ioi", "--store", str(store), "--report",
                 str(tmp_path / "r" / "ioi.html"))
    assert "causal trace: skipped" in out and "subject" in out
    assert f"report: {tmp_path / 'r' / 'ioi.html'}" in out
    assert f"open the dashboard: mechscope app --store {store}" in out
    assert "ROC-AUC vs ground truth zoo:ioi" in out
    from mechscope.circuits.evaluate import CircuitEvaluation
    from mechscope.store import Store

    ro = Store(store, readonly=True)
    run_id = ro.latest("demo").id
    ev = CircuitEvaluation.load(ro, run_id, "circuit_evaluation")
    assert ev.reference.startswith("ground truth zoo:ioi")
    assert ev.method("patching").metrics["roc_auc"] > 0.9  # exact patching finds the truth
    assert ro.json(run_id, "tokens")[0][0] == "0"  # BOS


def test_demo_without_attribution(capsys, tmp_path):
    store = tmp_path / "store"
    out, _ = _ok(capsys, "demo", "--model", TINY, "--store", str(store), "--no-attribution",
                 "--no-report", "--json")
    summary = json.loads(out)
    assert summary["causal_trace"] is None and summary["patching"] is None
    assert summary["report"] is None
    assert "causal_trace" not in summary["timings"]
    out, _ = _ok(capsys, "runs", "--store", str(store), "--json")
    assert "causal_trace" not in json.loads(out)["runs"][0]["results"]


def test_zoo_list_json(capsys):
    out, _ = _ok(capsys, "zoo", "list", "--json")
    assert isinstance(json.loads(out)["zoo"], list)


def test_help_for_every_verb(capsys):
    for verb in (["models"], ["trace"], ["patch"], ["causal-trace"], ["runs"], ["demo"],
                 ["zoo", "list"], ["zoo", "train"], ["circuits", "sae"]):
        main([*verb, "--help"])
        assert "Usage" in capsys.readouterr().out


def _hint(err: str) -> list[str]:
    """The command an error suggests (between backticks), as argv for main()."""
    import re
    import shlex

    commands = re.findall(r"`(mechscope [^`]+)`", err)
    assert commands, f"no command suggested in {err!r}"
    return shlex.split(commands[0])[1:]


@pytest.fixture
def no_smollm2(monkeypatch, tmp_path):
    """Hints name the default model only where it is installed: make it look missing (so the
    followed hints run on a zoo model, fast), and work in an empty folder."""
    import mechscope.models.smollm2 as sm

    monkeypatch.setattr(sm, "smollm2_available", lambda: False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("case", ["file", "missing", "missing-under-a-file", "plain-folder"])
def test_runs_hint_works_when_followed(cli, capsys, tmp_path, no_smollm2, case):
    (tmp_path / "notes.txt").write_text("not a store")
    (tmp_path / "plain").mkdir()
    store = {"file": "notes.txt", "missing": "new/store", "missing-under-a-file": "notes.txt/s",
             "plain-folder": "plain"}[case]
    code, out, err = cli.run("runs", "--store", store)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    if case == "file":
        assert "is a file" in err and "folder" in err
    argv = _hint(err)
    assert argv[0] == "demo" and "--model" in argv  # smollm2 looks missing: a model that is here
    _ok(capsys, *argv)  # the suggested command succeeds...
    folder = argv[argv.index("--store") + 1]
    out, _ = _ok(capsys, "runs", "--store", folder, "--json")  # ...and makes a store runs lists
    assert [r["status"] for r in json.loads(out)["runs"]] == ["complete"]
    assert (tmp_path / "notes.txt").read_text() == "not a store"


def test_demo_on_a_file_suggests_a_folder_that_works(cli, capsys, tmp_path, no_smollm2):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = cli.run("demo", "--model", TINY, "--store", "notes.txt")
    assert code == 2 and "is a file" in err
    folder = err.split("--store ")[-1].strip()
    _ok(capsys, "demo", "--model", TINY, "--store", folder)
    assert (tmp_path / folder / "store.db").is_file()


def test_unknown_zoo_model_hint_names_what_works(cli, capsys, tmp_path):
    from mechscope.models.zoo import RECIPES, zoo_names

    code, _, err = cli.run("trace", "zoo:nope", "--tokens", "1,2")
    assert code == 2 and "unknown zoo model 'nope'" in err
    assert "zoo train nope" not in err  # there is no such recipe
    for name in zoo_names():
        assert f"zoo:{name}" in err
    for name in RECIPES:
        assert name in err
    # Following it: every listed model traces.
    for name in zoo_names():
        out, _ = _ok(capsys, "trace", f"zoo:{name}", "--tokens", "1,2,3", "--json")
        assert json.loads(out)["predictions"][0]["n_tokens"] == 3


def _snapshot(root):
    """Every path under root with its size, mtime and mode."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


def test_runs_reads_a_read_only_store_and_writes_nothing(capsys, tmp_path):
    store = tmp_path / "store"
    _ok(capsys, "demo", "--model", TINY, "--store", str(store))
    paths = [store, *store.rglob("*")]
    try:
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        before = _snapshot(store)
        out, _ = _ok(capsys, "runs", "--store", str(store), "--json")
        after = _snapshot(store)
        if os.geteuid() == 0:  # root writes anywhere: SQLite may add or touch its -wal/-shm
            companions = ("store.db-wal", "store.db-shm")  # (the demo's report read left them)
            before = {k: v for k, v in before.items() if k not in companions}
            after = {k: v for k, v in after.items() if k not in companions}
        assert after == before  # no file created, changed or re-moded
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    runs = json.loads(out)["runs"]
    assert [r["status"] for r in runs] == ["complete"]
    assert {"predictions", "head_norms", "trace_shapes", "model"} <= set(runs[0]["results"])


def _tree_digest(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_zoo_train_writes_to_the_cache_never_the_package(capsys, tmp_path, monkeypatch):
    from mechscope.models import load
    from mechscope.models.zoo import CHECKPOINTS

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    shipped = _tree_digest(CHECKPOINTS)
    old = os.umask(0o027)
    try:
        out, _ = _ok(capsys, "zoo", "train", "induction", "--steps", "2", "--json")
    finally:
        os.umask(old)
    folder = tmp_path / "cache" / "zoo" / "induction"
    assert json.loads(out)["out"] == str(folder)
    assert _tree_digest(CHECKPOINTS) == shipped  # the shipped checkpoints are untouched
    assert (folder / "model.safetensors").is_file()
    assert folder.stat().st_mode & 0o777 == 0o750  # the umask decides, not mkdtemp's 0700
    for name in ("card.json", "model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o640
    # The printed way to load it works.
    out, _ = _ok(capsys, "zoo", "train", "induction", "--steps", "2")
    argv = _hint(out)
    assert argv[:2] == ["trace", str(folder)]
    _ok(capsys, *argv)
    assert load(str(folder)).cfg.n_layers == load("zoo:induction").cfg.n_layers


@pytest.mark.parametrize("where", ["checkpoints", "checkpoints/induction", "package"])
def test_zoo_train_refuses_the_package(cli, where):
    import mechscope
    from mechscope.models.zoo import CHECKPOINTS

    target = {"checkpoints": CHECKPOINTS, "checkpoints/induction": CHECKPOINTS / "induction",
              "package": Path(mechscope.__file__).parent}[where]
    shipped = _tree_digest(CHECKPOINTS)
    code, out, err = cli.run("zoo", "train", "induction", "--steps", "1", "--out", str(target))
    assert code == 2 and out == "" and "inside the mechscope package" in err
    assert _tree_digest(CHECKPOINTS) == shipped


def test_zoo_train_restores_global_state(tmp_path):
    import random

    import numpy as np
    import torch

    from mechscope.models.zoo import train_zoo

    def state():
        return (torch.random.get_rng_state().clone(), repr(np.random.get_state()),
                random.getstate(), torch.get_num_threads())

    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    before = state()
    train_zoo("induction", steps=2, out_dir=tmp_path, progress=False)
    after = state()
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]


def test_demo_keeps_the_global_generator_and_times_consistently(tmp_path):
    import torch

    from mechscope.demo import DemoConfig, run_demo
    from mechscope.store import Store

    torch.manual_seed(99)
    rng = torch.random.get_rng_state().clone()
    summary = run_demo(DemoConfig(model=TINY), tmp_path / "store", progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)
    timings = summary["timings"]
    assert timings["total"] >= timings["load"] and timings["total"] >= timings["trace"]
    assert timings["total"] >= timings["causal_trace"] + timings["patching"]
    store = Store(tmp_path / "store", readonly=True)
    assert store.get_run(summary["run_id"]).timings == timings
    model = store.json(summary["run_id"], "model")
    assert model["kind"] == "native" and model["spec"] == TINY
    # same seed, same prompts: a second demo predicts the same
    again = run_demo(DemoConfig(model=TINY), tmp_path / "store", progress=False)
    assert again["predictions"] == summary["predictions"]
    assert again["causal_trace"] == summary["causal_trace"]
    assert again["patching"] == summary["patching"]


def test_demo_with_an_unknown_model_creates_no_store(cli, tmp_path):
    code, _, err = cli.run("demo", "--model", "no-such-model", "--store", str(tmp_path / "s"))
    assert code == 2 and "unknown model spec" in err
    assert not (tmp_path / "s").exists()


def test_zoo_train_never_replaces_a_folder_that_is_not_a_checkpoint(cli, tmp_path):
    (tmp_path / "induction").mkdir()
    (tmp_path / "induction" / "thesis.tex").write_text("years of work")
    code, _, err = cli.run("zoo", "train", "induction", "--steps", "1", "--out", str(tmp_path))
    assert code == 2 and "not a zoo checkpoint" in err
    assert (tmp_path / "induction" / "thesis.tex").read_text() == "years of work"
