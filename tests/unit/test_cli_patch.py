"""`mechscope patch`: a thin wrapper over patch_sweep / attribution_patch."""

from __future__ import annotations

import pytest
import torch

from mechscope.attribution import patch_sweep
from mechscope.attribution.attrib_patch import attribution_patch
from mechscope.cli import main
from mechscope.models import load
from mechscope.tasks.base import TaskBatch

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32"
CLEAN, CORRUPT = "1,2,3,4,5,6", "1,2,11,4,5,6"


def _task(model, clean, corrupt, answer=None, wrong=None):
    c, k = torch.tensor([clean]), torch.tensor([corrupt])
    with torch.no_grad():
        a = int(model(c)[0, -1].argmax()) if answer is None else answer
        w = int(model(k)[0, -1].argmax()) if wrong is None else wrong
    return TaskBatch(task="cli", clean=c, corrupt=k, answer=torch.tensor([a]),
                     corrupt_answer=torch.tensor([w]), answer_pos=torch.tensor([len(clean) - 1]),
                     seed=0)  # fmt: skip


@pytest.mark.parametrize("method", ["exact", "attribution"])
@pytest.mark.parametrize("site,by,direction", [("resid_pre", "position", "denoise"),
                                               ("heads", "position", "noise"),
                                               ("attn_out", "all", "denoise")])
def test_json_on_tiny_gives_the_engine_numbers(cli, method, site, by, direction):
    data = cli.json("patch", TINY, "--clean-tokens", CLEAN, "--corrupt-tokens", CORRUPT,
                 "--site", site, "--by", by, "--direction", direction, "--method", method,
                 "--json")  # fmt: skip
    model = load(TINY)
    task = _task(model, [1, 2, 3, 4, 5, 6], [1, 2, 11, 4, 5, 6])
    fn = patch_sweep if method == "exact" else attribution_patch
    kwargs = {"progress": False} if method == "exact" else {}
    ref = fn(model, task, site=site, by=by, direction=direction, **kwargs)
    assert torch.allclose(torch.tensor(data["scores"]), ref.scores, atol=1e-6)
    assert data["tokens"] == ["1", "2", "3", "4", "5", "6"]
    assert data["method"] == method and data["site"] == site and data["by"] == by
    assert data["direction"] == direction and data["n_skipped"] == ref.n_skipped
    assert data["metric_clean"] == pytest.approx(ref.metric_clean)
    assert data["metric_corrupt"] == pytest.approx(ref.metric_corrupt)
    assert 0.0 <= data["p_clean"] <= 1.0 and 0.0 <= data["p_corrupt"] <= 1.0


def test_zoo_ioi_with_answers_and_store(cli, tmp_path):
    from mechscope.models.zoo.groundtruth import GroundTruth

    batch = GroundTruth.load("zoo:ioi").by_position[0].batch.batch()
    n = int(batch.answer_pos[0]) + 1
    clean = [int(t) for t in batch.clean[0, :n]]
    corrupt = [int(t) for t in batch.corrupt[0, :n]]
    a, w = int(batch.answer[0]), int(batch.corrupt_answer[0])
    data = cli.json("patch", "zoo:ioi", "--clean-tokens", ",".join(map(str, clean)),
                 "--corrupt-tokens", ",".join(map(str, corrupt)), "--site", "heads",
                 "--answer", str(a), "--wrong", str(w), "--json", "--store",
                 str(tmp_path / "s"))  # fmt: skip
    ref = patch_sweep(load("zoo:ioi"), _task(load("zoo:ioi"), clean, corrupt, a, w),
                      site="heads", progress=False)  # fmt: skip
    assert torch.allclose(torch.tensor(data["scores"]), ref.scores, atol=1e-6)
    assert data["run_id"] and (tmp_path / "s" / "store.db").is_file()


def test_human_output_is_a_table(capsys):
    main(["patch", TINY, "--clean-tokens", CLEAN, "--corrupt-tokens", CORRUPT])
    out = capsys.readouterr().out
    assert "exact resid_pre denoise" in out and "score" in out


def test_help(capsys):
    main(["patch", "--help"])  # exit status 0: main returns
    out = capsys.readouterr().out
    assert "--method" in out and "--clean-tokens" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["patch", TINY, "--clean-tokens", "1,2,3", "--corrupt-tokens", "1,2"],
         "clean has 3 tokens but corrupt has 2"),
        (["patch", TINY, "--clean-tokens", CLEAN, "--corrupt-tokens", CORRUPT, "--site", "bogus"],
         "cannot sweep site"),
        (["patch", TINY], "give either --clean"),
        (["patch", TINY, "--clean-tokens", CLEAN], "give either --corrupt"),
        (["patch", TINY, "--clean", "hello", "--corrupt", "world"], "no tokenizer"),
        (["patch", TINY, "--clean-tokens", CLEAN, "--corrupt-tokens", CLEAN],
         "doesn't change the prediction"),
        (["patch", TINY, "--clean-tokens", CLEAN, "--corrupt-tokens", CORRUPT, "--method", "x"],
         "--method"),
        (["patch", TINY, "--clean-tokens", CLEAN, "--corrupt-tokens", CORRUPT, "--by", "row"],
         "by must be"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, argv, words):
    code, out, err = cli.run(*argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
