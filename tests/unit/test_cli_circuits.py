"""`mechscope circuits sae`: a thin wrapper over circuits.sae.default_run plus, on a zoo model,
the evaluation against its ground truth."""

from __future__ import annotations

import torch

from mechscope.circuits import sae
from mechscope.models import load

ZOO = "zoo:retrieval"


def test_json_gives_the_library_numbers_and_the_evaluation(cli):
    data = cli.json("circuits", "sae", ZOO, "--json")
    ref = sae.default_run(load(ZOO), progress=False).payload(10)
    assert data["model"] == ZOO and data["analysis"] == "sae" and data["run_id"] is None
    assert torch.equal(torch.tensor(data["scores"]), torch.tensor(ref["scores"]))
    assert data["heads"] == ref["heads"] and data["ranked"] == ref["ranked"]
    assert len(data["scores"]) == 2 and all(len(r) == 8 for r in data["scores"])
    ev = data["evaluation"]
    assert ev["reference"].startswith("ground truth zoo:retrieval")
    assert set(ev["methods"]) == {"sae", "patching", "attribution", "detector"}
    assert ev["methods"]["sae"]["roc_auc"] == 1.0  # the two copy heads are the only scorers
    assert all(0.0 <= m["roc_auc"] <= 1.0 for m in ev["methods"].values())


def test_no_eval_and_store_round_trip(cli, tmp_path):
    from mechscope.store import Store

    data = cli.json("circuits", "sae", "zoo:ioi", "--n", "16", "--epochs", "50", "--no-eval",
                    "--store", str(tmp_path / "s"), "--json")  # fmt: skip
    assert data["evaluation"] is None and data["sae"]["epochs"] == 50
    saved = sae.SAECircuit.load(Store(tmp_path / "s", readonly=True), data["run_id"])
    assert saved.node_scores.tolist() == data["scores"]


def test_human_output(capsys):
    from mechscope.cli import main

    main(["circuits", "sae", "zoo:ioi", "--n", "16", "--top", "3"])
    out = capsys.readouterr().out
    assert "top 3 heads by node score" in out and out.count("\n  L") >= 3
    assert "ROC-AUC" in out and "sae" in out and "patching" in out


def test_bad_inputs_name_the_fix(cli):
    code, _, err = cli.run("circuits", "sae", "zoo:ioi", "--task", "induction")
    assert code != 0 and "--task ioi" in err
    code, _, err = cli.run("circuits", "sae", "zoo:ioi", "--reduce", "max")
    assert code != 0 and "--reduce must be one of mean, answer" in err
    code, _, err = cli.run("circuits", "sae", "nosuchmodel")
    assert code != 0 and "nosuchmodel" in err
    code, _, err = cli.run("circuits", "sae", "native:n_layers=1,d_model=16,n_heads=2,d_head=8,"
                           "d_vocab=11,n_ctx=8")  # fmt: skip
    assert code != 0 and "no tokenizer" in err


def test_help_lists_the_verb(capsys):
    import contextlib

    from mechscope.cli import main

    with contextlib.suppress(SystemExit):
        main(["circuits", "--help"])
    assert "sae" in capsys.readouterr().out
