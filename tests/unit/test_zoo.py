"""The zoo: shipped checkpoints solve their tasks by the mechanism their cards claim.

Accuracy and head scores are measured on fresh seeded samples (seeds differ from the ones the
ground truth was computed with); training is exercised for a few steps only.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.errors import SpecError, WeightFileError
from mechscope.models.zoo import RECIPES, list_zoo, load_zoo, train_zoo, zoo_card, zoo_names
from mechscope.models.zoo.data import EVAL_BATCHES
from mechscope.models.zoo.groundtruth import GroundTruth
from mechscope.models.zoo.truth import accuracy, detector_scores, uniform_attention
from mechscope.probes import count_hooks, intervene, trace

SHIPPED = zoo_names()
REQUIRED = ["induction", "retrieval", "facts", "ioi"]
FRESH_SEED = 4242


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: load_zoo(name) for name in SHIPPED}


def test_required_checkpoints_are_shipped_and_small() -> None:
    assert set(REQUIRED) <= set(SHIPPED)
    total = sum(f.stat().st_size for n in SHIPPED for f in zoo_card(n).directory.iterdir())
    assert total < 10_000_000


@pytest.mark.parametrize("name", SHIPPED)
def test_checkpoint_is_complete(name: str) -> None:
    card = zoo_card(name)
    files = {p.name for p in card.directory.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "card.json",
        "card.md",
        "ground_truth.json",
    } <= files
    for key in ("name", "task", "description", "accuracy", "circuit_heads", "circuit_rule",
                "mechanism", "verification", "recipe", "train_seconds", "n_params"):  # fmt: skip
        assert key in card.card, key
    assert card.card["recipe"]["seed"] == RECIPES[name].seed
    assert card.card["recipe"]["steps"] == RECIPES[name].steps
    truth = GroundTruth.load(card.directory)
    cfg = card.config
    assert truth.head_denoise.shape == (cfg["n_layers"], cfg["n_heads"])
    assert truth.name == name and truth.accuracy == card.accuracy


@pytest.mark.parametrize("name", SHIPPED)
def test_accuracy_on_fresh_samples(models: dict, name: str) -> None:
    recipe = RECIPES[name]
    batches = EVAL_BATCHES[recipe.task](recipe, 66, FRESH_SEED)
    assert accuracy(models[name], batches) >= 0.95
    assert count_hooks(models[name]) == 0


def test_induction_heads_by_head_detector(models: dict) -> None:
    scores = detector_scores(models["induction"], n=4, seed=FRESH_SEED)
    assert max(scores["previous_token"][0]) >= 0.8
    assert max(scores["induction"][1]) >= 0.8


def test_retrieval_heads_ablation(models: dict) -> None:
    model, recipe = models["retrieval"], RECIPES["retrieval"]
    truth = GroundTruth.load("zoo:retrieval").retrieval
    assert truth is not None
    ret = list(truth.heads)
    assert ret
    batches = EVAL_BATCHES[recipe.task](recipe, 44, FRESH_SEED)
    assert accuracy(model, batches, uniform_attention(ret)) < 0.5
    circuit = {tuple(h) for h in zoo_card("retrieval").circuit_heads} | set(truth.local_heads)
    others = [(a, b) for a in range(model.cfg.n_layers) for b in range(model.cfg.n_heads)
              if (a, b) not in circuit | set(ret)]  # fmt: skip
    assert len(others) >= len(ret)
    gen = torch.Generator().manual_seed(FRESH_SEED)
    for _ in range(3):
        pick = [others[int(i)] for i in torch.randperm(len(others), generator=gen)[: len(ret)]]
        assert accuracy(model, batches, uniform_attention(pick)) >= 0.5, pick


def test_retrieval_mechanism_is_key_tagging_then_copy(models: dict) -> None:
    """The card's mechanism: layer-0 local heads tag each value with its key; layer-1 heads copy."""
    model, recipe = models["retrieval"], RECIPES["retrieval"]
    truth = GroundTruth.load("zoo:retrieval").retrieval
    assert truth is not None
    assert truth.local_heads and all(layer == 0 for layer, _ in truth.local_heads)
    assert all(layer == 1 for layer, _ in truth.heads)
    batches = EVAL_BATCHES[recipe.task](recipe, 44, FRESH_SEED + 1)
    assert accuracy(model, batches, uniform_attention(truth.local_heads)) < 0.5


def test_uniform_ablation_keeps_rows_causal_and_stochastic(models: dict) -> None:
    model = models["induction"]
    tokens = torch.randint(1, 256, (2, 9))
    with intervene(model, uniform_attention([(0, 1)])):
        seen = trace(model, tokens, sites=("patterns",), layers=(0,), progress=False)
    p = seen.pattern(0)[:, 1]
    assert torch.allclose(p.sum(-1), torch.ones(2, 9))
    assert torch.allclose(p[0, 3, :4], torch.full((4,), 0.25)) and float(p[0, 3, 4:].sum()) == 0
    assert count_hooks(model) == 0


def test_list_zoo_shows_accuracy_and_circuit() -> None:
    cards = {c.name: c for c in list_zoo()}
    assert set(REQUIRED) <= set(cards)
    for c in cards.values():
        assert 0.0 <= c.accuracy <= 1.0
        assert c.circuit_heads or c.card.get("retrieval_heads")
        assert f"acc={c.accuracy:.3f}" in c.summary()


def test_unknown_name_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="zoo:induction"):
        zoo_card("no-such-model")


def test_strict_loading_rejects_bad_weights(tmp_path) -> None:
    src = zoo_card("induction").directory
    shutil.copytree(src, tmp_path / "induction")
    weights = tmp_path / "induction" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(WeightFileError):
        load_zoo("induction", root=tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state["embed.weight"] = state["embed.weight"][:, :32].contiguous()  # wrong shape
    save_file(state, str(weights))
    with pytest.raises(WeightFileError, match="wrong shapes"):
        load_zoo("induction", root=tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(WeightFileError, match="unexpected"):
        load_zoo("induction", root=tmp_path)


def test_float16_weights_load_as_float32(tmp_path, models: dict) -> None:
    src = zoo_card("induction").directory
    shutil.copytree(src, tmp_path / "induction")
    state = {k: v.half() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(tmp_path / "induction" / "model.safetensors"))
    model = load_zoo("induction", root=tmp_path)
    assert next(model.parameters()).dtype == torch.float32
    recipe = RECIPES["induction"]
    assert accuracy(model, EVAL_BATCHES["induction"](recipe, 32, FRESH_SEED)) >= 0.95


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_train_zoo_writes_a_loadable_checkpoint(tmp_path, name: str) -> None:
    card = train_zoo(name, steps=3, out_dir=tmp_path, progress=False)
    assert card.name == name and card.directory == tmp_path / name
    assert card.card["recipe"]["steps"] == 3
    raw = json.loads((tmp_path / name / "ground_truth.json").read_text())
    truth = GroundTruth.load(tmp_path / name)
    assert truth.to_dict() == raw and truth.name == name
    assert truth.head_denoise.shape == (RECIPES[name].n_layers, RECIPES[name].n_heads)
    model = load_zoo(name, root=tmp_path)
    assert model.cfg.n_layers == RECIPES[name].n_layers
    assert (tmp_path / name / "card.md").read_text().startswith(f"# zoo:{name}")


def test_training_streams_mask_only_predictable_positions() -> None:
    import numpy as np

    from mechscope.models.zoo.data import TRAIN_STREAMS
    from mechscope.tasks.retrieval import RetrievalVocab

    recipe = RECIPES["retrieval"]
    rng = np.random.default_rng(0)
    tokens, mask = TRAIN_STREAMS["retrieval"](recipe, rng, recipe.steps - 1)  # retrieval phase
    assert tokens.shape[0] == recipe.batch_size
    assert mask.shape == (tokens.shape[0], tokens.shape[1] - 1)
    v = RetrievalVocab()
    targets = tokens[:, 1:][mask]
    assert all(int(t) in v.values for t in targets)  # only values are predicted
    # every predicted value follows a query key that appeared earlier as 'key value'
    for row, m in zip(tokens, mask, strict=True):
        for p in torch.nonzero(m).flatten().tolist():
            key, value = int(row[p]), int(row[p + 1])
            assert int(row[p - 1]) == v.query
            earlier = [i for i in range(1, p - 1) if int(row[i]) == key]
            assert earlier and int(row[earlier[0] + 1]) == value


def test_proximal_head_shrink_and_sinusoidal_positions() -> None:
    from mechscope.models.native import boot_native_config
    from mechscope.models.zoo.train import (
        head_group_norms,
        head_parameters,
        shrink_heads,
        sinusoidal,
    )

    model = boot_native_config(RECIPES["induction"].model_config())
    params = head_parameters(model)
    before = head_group_norms(model).detach().clone()
    shrink_heads(model, params, 0.5)
    assert torch.allclose(before - head_group_norms(model).detach(), torch.full_like(before, 0.5),
                          atol=1e-4)  # fmt: skip
    shrink_heads(model, params, 1e6)  # cannot go below zero
    assert float(head_group_norms(model).detach().max()) < 1e-3
    table = sinusoidal(64, 16, rms=1.0)
    assert abs(float(table.square().mean().sqrt()) - 1.0) < 1e-5
    # shift invariance: <pos p, pos p+k> depends on k only, so one QK map finds 'p-1' everywhere
    for k in (1, 2, 5):
        dots = (table[:-k] * table[k:]).sum(-1)
        assert float(dots.max() - dots.min()) < 1e-3
