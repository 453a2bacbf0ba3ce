"""``mechscope discover SPEC.toml``: a scripted pipeline, checked before anything runs, end to
end into one run and a report."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechscope.discover import ANALYSES, load_spec, parse_spec
from mechscope.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "discover"

SPEC = """
model = "zoo:ioi"
seed = 0
analyses = ["sae", "evaluation", "sinks"]

[task]
n = 16

[options.sae]
epochs = 200

[options.evaluation]
methods = ["sae", "patching"]

[circuit]
method = "patching"
k = 2
"""


def test_the_examples_parse() -> None:
    specs = sorted(EXAMPLES.glob("*.toml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        assert set(spec.analyses) <= set(ANALYSES) and spec.source == str(path)


@pytest.mark.parametrize(("text", "message"), [
    ('seed = 0', "`model` is required"),
    ('model = "zoo:ioi"\nmodle = 1', "unknown key(s) ['modle']"),
    ('model = "zoo:ioi"\nanalyses = ["sea"]', "unknown analysis 'sea'"),
    ('model = "zoo:ioi"\nanalyses = []', "`analyses` is empty"),
    ('model = "zoo:ioi"\nanalyses = ["sae"]\n[options.sinks]\nthreshold = 1',
     "[options.sinks] is given but 'sinks' is not in `analyses`"),
    ('model = "zoo:ioi"\nanalyses = ["sae"]\n[options.sae]\nepoch = 3', "unknown key(s) ['epoch']"),
    ('model = "zoo:ioi"\nanalyses = ["sae"]\n[options.sae]\nepochs = 0', "epochs must be >= 1"),
    ('model = "zoo:ioi"\nanalyses = ["sinks"]\n[options.sinks]\nbogus = 1', "unknown key(s) ['bogus']"),
    ('model = "zoo:ioi"\nanalyses = ["sae"]\n[circuit]\nmethod = "retrieval"',
     "circuit.method 'retrieval' is not ranked by any listed analysis"),
    ('model = "zoo:ioi"\nanalyses = ["sae"]\n[circuit]\nk = 0', "circuit.k must be at least 1"),
    ('model = "zoo:ioi"\nanalyses = ["causal_trace"]', "causal_trace needs [options.causal_trace]"),
    ('model = "zoo:ioi"\nseed = "one"', "seed must be an integer"),
    ('model = "zoo:ioi"\n[task]\nn = 1', "task.n must be at least 2"),
])  # fmt: skip
def test_bad_specs_name_the_problem(tmp_path, text, message) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_spec(path)
    assert message in str(info.value)


def test_unreadable_specs(tmp_path) -> None:
    with pytest.raises(InputError, match="no spec file"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "zoo:ioi"\nanalyses = [1 2]\nseed = 0\n')
    with pytest.raises(InputError, match="not valid TOML.*line"):
        load_spec(bad)
    with pytest.raises(InputError, match="unknown key"):
        parse_spec({"model": "zoo:ioi", "extra": 1})


def test_discover_end_to_end_into_one_run_and_a_report(cli, tmp_path) -> None:
    from mechscope.circuits.graph import Circuit
    from mechscope.results import Result, stored_results
    from mechscope.store import Store

    spec = tmp_path / "ioi.toml"
    spec.write_text(SPEC)
    store = tmp_path / "store"
    summary = cli.json("discover", str(spec), "--store", str(store), "--json")
    ro = Store(store, readonly=True)
    rec = ro.get_run(summary["run_id"])
    assert rec.kind == "discover" and rec.status == "complete" and rec.model_spec == "zoo:ioi"
    assert set(stored_results(ro, rec.id)) == {"sae", "evaluation", "sinks", "circuit"}
    ev = Result.load(ro, rec.id, "evaluation")
    assert ev.reference.startswith("ground truth zoo:ioi")
    circuit = Circuit.load(ro, rec.id, "circuit")
    # the circuit is the patching ranking's top 2: zoo:ioi's two circuit heads
    assert sorted(circuit.heads) == sorted(tuple(h) for h in ev.members.nonzero().tolist())
    assert summary["circuit"]["heads"] == [list(h) for h in circuit.heads]
    report = Path(summary["report"])
    assert report.is_file() and report.parent == (store / "reports").resolve()
    assert rec.config["analyses"] == ["sae", "evaluation", "sinks"]


def test_discover_bad_inputs_write_nothing(cli, tmp_path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text('model = "no-such-model"\nanalyses = ["sinks"]\n')
    code, out, err = cli.run("discover", str(spec), "--store", str(tmp_path / "s"))
    assert code == 2 and out == "" and "no-such-model" in err
    assert not (tmp_path / "s").exists()
    code, _, err = cli.run("discover", str(tmp_path / "none.toml"), "--store", str(tmp_path / "s"))
    assert code == 2 and "no spec file" in err and not (tmp_path / "s").exists()
