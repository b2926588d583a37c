"""Model and LoRA directories: exact-key loading, bit-exact save/load round trips, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from voxcpm_core.dev.builder import build_model_dir, tiny_config
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.families import FAMILIES
from voxcpm_core.io.checkpoint import (
    load_lora_dir,
    load_model_dir,
    load_state_dict_file,
    read_model_config,
    save_lora_dir,
    save_model_dir,
)
from voxcpm_core.models.lora import LoRAConfig, apply_lora, parse_lora_config

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny", tiny_config(16000), seed=0)


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A private copy of the tiny model directory to damage."""
    return shutil.copytree(tiny_dir, tmp_path / "model")


def _files_equal(a, b) -> bool:
    return a.read_bytes() == b.read_bytes()


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---- loading ----------------------------------------------------------------------------------


def test_fixture_loads_with_exact_keys(preset_dir):
    loaded = load_model_dir(preset_dir / "base")
    weights = load_file(preset_dir / "base" / WEIGHTS)
    vae_weights = load_state_dict_file(preset_dir / "base" / "audiovae.pth")
    assert _tensors_equal(loaded.model.state_dict(), weights)
    assert _tensors_equal(loaded.vae.state_dict(), vae_weights)
    assert loaded.config_dict == json.loads((preset_dir / "base" / "config.json").read_text())
    assert not loaded.model.training and not loaded.vae.training


def test_runtime_dtype_rules(tiny_dir):
    default = load_model_dir(tiny_dir)
    assert next(default.model.parameters()).dtype == torch.float32
    bf16 = load_model_dir(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.vae.parameters()} == {torch.float32}  # the VAE always runs in float32
    with pytest.raises(VoxCPMError, match="'int8' is not a floating-point torch dtype"):
        load_model_dir(tiny_dir, dtype="int8")


def test_lora_structure_is_added_before_loading(tiny_dir):
    loaded = load_model_dir(tiny_dir, lora=LoRAConfig(enable_lm=True, enable_dit=True, enable_proj=True))
    keys = loaded.model.state_dict().keys()
    lora_keys = {k for k in keys if k.endswith((".lora_A", ".lora_B"))}
    assert lora_keys and set(keys) - lora_keys == set(load_file(tiny_dir / WEIGHTS))


# ---- saving -----------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(preset_dir, tmp_path):
    source = preset_dir / "base"
    out = load_model_dir(source).save(tmp_path / "copy")
    assert _tensors_equal(load_file(out / WEIGHTS), load_file(source / WEIGHTS))
    assert _tensors_equal(
        load_state_dict_file(out / "audiovae.pth"), load_state_dict_file(source / "audiovae.pth")
    )
    assert torch.load(out / "audiovae.pth", weights_only=True).keys() == {"state_dict"}
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert _files_equal(out / name, source / name)
    again = load_model_dir(out)
    assert _tensors_equal(again.model.state_dict(), load_file(source / WEIGHTS))
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folders left behind


def test_save_writes_the_config_dtype_and_no_lora_keys(tmp_path):
    config = tiny_config(44100) | {"dtype": "bfloat16"}
    source = build_model_dir(tmp_path / "bf16", config, seed=1)
    original = load_file(source / WEIGHTS)
    assert {v.dtype for v in original.values()} == {torch.bfloat16}
    loaded = load_model_dir(source, lora=LoRAConfig(enable_lm=True))  # float32 on CPU, with LoRA layers
    out = loaded.save(tmp_path / "saved")
    assert _tensors_equal(load_file(out / WEIGHTS), original)  # bf16 -> f32 -> bf16 is lossless


def test_save_refuses_to_clobber_and_cleans_up_on_failure(tiny_dir, tmp_path):
    loaded = load_model_dir(tiny_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(VoxCPMError, match="already exists"):
        loaded.save(tmp_path / "taken")
    with pytest.raises(VoxCPMError, match="no tokenizer.json"):
        save_model_dir(tmp_path / "new", loaded.model, loaded.vae, loaded.config_dict, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    loaded.save(tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / WEIGHTS).is_file()


# ---- one-line errors on broken directories ----------------------------------------------------


def _load_error(path) -> str:
    with pytest.raises(VoxCPMError) as info:
        load_model_dir(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    assert "model directory not found" in _load_error(tmp_path / "nope")


def test_missing_model_file(broken):
    (broken / WEIGHTS).unlink()
    assert "no model weights found (expected model.safetensors or pytorch_model.bin)" in _load_error(broken)


def test_missing_vae_file(broken):
    (broken / "audiovae.pth").unlink()
    assert "no audio VAE weights found" in _load_error(broken)


def test_extra_key(broken):
    weights = load_file(broken / WEIGHTS)
    save_file(weights | {"audio_vae.extra.weight": torch.zeros(2)}, broken / WEIGHTS)
    assert "unexpected 1 key(s): audio_vae.extra.weight" in _load_error(broken)


def test_missing_key(broken):
    weights = load_file(broken / WEIGHTS)
    del weights["stop_head.weight"]
    save_file(weights, broken / WEIGHTS)
    assert "missing 1 key(s): stop_head.weight" in _load_error(broken)


def test_wrong_shape(broken):
    weights = load_file(broken / WEIGHTS)
    weights["stop_head.weight"] = torch.zeros(3, 3)
    save_file(weights, broken / WEIGHTS)
    assert "stop_head.weight has shape [3, 3] but config.json implies [2, 64]" in _load_error(broken)


def test_corrupt_safetensors(broken):
    data = (broken / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert "unreadable safetensors file" in _load_error(broken)


def test_corrupt_torch_pickle(broken):
    (broken / "audiovae.pth").write_bytes(b"not a checkpoint")
    assert "audiovae.pth: unreadable torch checkpoint" in _load_error(broken)


def test_bad_config_json(broken):
    (broken / "config.json").write_text("{ not json")
    assert "config.json: not valid JSON" in _load_error(broken)
    config = tiny_config(16000)
    config["lm_config"]["num_key_value_heads"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    assert "must be a multiple of num_key_value_heads" in _load_error(broken)


def test_architecture_picks_the_family_and_an_unknown_one_is_one_line(broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"architecture": "VoxCPM"}))  # read lower-cased
    loaded = load_model_dir(broken)
    assert loaded.config.architecture == "voxcpm" and loaded.config_dict["architecture"] == "VoxCPM"
    assert type(loaded.model) is FAMILIES["voxcpm"].network and type(loaded.vae) is FAMILIES["voxcpm"].vae
    (broken / "config.json").write_text(json.dumps(config | {"architecture": "voxcpm9"}))
    message = _load_error(broken)  # one line
    assert f"config.json: unknown architecture 'voxcpm9'; known architectures: {', '.join(FAMILIES)};" in message
    with pytest.raises(VoxCPMError, match="unknown architecture 'voxcpm9'"):
        read_model_config(broken)


def test_pytorch_model_bin_with_state_dict_wrapper(broken):
    weights = load_file(broken / WEIGHTS)
    (broken / WEIGHTS).unlink()
    torch.save({"state_dict": weights}, broken / "pytorch_model.bin")
    assert _tensors_equal(load_model_dir(broken).model.state_dict(), weights)


# ---- LoRA directories -------------------------------------------------------------------------


def test_lora_dir_round_trip_matches_the_reference_layout(preset_dir, tmp_path):
    state_dict, meta = load_lora_dir(preset_dir / "lora")
    cfg = parse_lora_config(meta["lora_config"])
    out = save_lora_dir(tmp_path / "adapter", state_dict, cfg, meta["base_model"])
    assert _files_equal(out / "lora_config.json", preset_dir / "lora" / "lora_config.json")
    assert _tensors_equal(load_file(out / "lora_weights.safetensors"), state_dict)
    assert load_lora_dir(out)[1] == meta


def test_lora_dir_from_a_model_keeps_only_lora_tensors(tiny_dir, tmp_path):
    model = load_model_dir(tiny_dir).model
    apply_lora(model, LoRAConfig(enable_lm=True))
    out = save_lora_dir(tmp_path / "adapter", model.state_dict(), LoRAConfig(enable_lm=True), tiny_dir)
    keys = set(load_file(out / "lora_weights.safetensors"))
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)


def test_lora_ckpt_without_config(tmp_path):
    tensors = {"base_lm.layers.0.self_attn.q_proj.lora_A": torch.ones(2, 3)}
    (tmp_path / "a").mkdir()
    torch.save({"state_dict": tensors}, tmp_path / "a" / "lora_weights.ckpt")
    state_dict, meta = load_lora_dir(tmp_path / "a")
    assert meta is None and _tensors_equal(state_dict, tensors)


def test_lora_dir_errors(tmp_path):
    with pytest.raises(VoxCPMError, match="LoRA checkpoint directory not found"):
        load_lora_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VoxCPMError, match="no LoRA weights found"):
        load_lora_dir(tmp_path / "empty")
    adapter = save_lora_dir(tmp_path / "bad", {}, LoRAConfig(), "base")
    (adapter / "lora_config.json").write_text(json.dumps({"base_model": "x", "lora_config": {"rank": 4}}))
    with pytest.raises(VoxCPMError, match="unknown LoRA option 'rank'"):
        load_lora_dir(adapter)
