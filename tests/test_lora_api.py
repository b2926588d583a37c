"""LoRA through the Python API of the guide: the official adapter reproduces the reference, adapters swap in
place (equal to a fresh load, base weights untouched), disabling/unloading gives the base model, and an
adapter of another structure is a clear error that changes nothing."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_data import reference_tensors

from voxcpm_core import api
from voxcpm_core.api import VoxCPM
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.checkpoint import load_lora_dir, save_lora_dir
from voxcpm_core.models.lora import LoRAConfig, parse_lora_config

GEN = dict(
    min_len=2, max_len=8, inference_timesteps=4, cfg_value=2.0, retry_badcase=False
)  # the reference runs
TEXT = "Hello world."


def _seed(preset_dir: Path) -> int:
    return json.loads((preset_dir / "reference.json").read_text())["sub_seeds"]["generate"]


def _speak(tts: VoxCPM, preset_dir: Path) -> np.ndarray:
    return tts.generate(TEXT, seed=_seed(preset_dir), **GEN)


@functools.cache
def _base_wav(preset_dir: Path) -> np.ndarray:
    return _speak(VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="float32"), preset_dir)


def _differs(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or np.abs(a - b).max() > 1e-3


def _other_adapter(preset_dir: Path, folder: Path, **config_changes) -> Path:
    """A second adapter for the same base: other values (and the structure changes asked for)."""
    tensors, meta = load_lora_dir(preset_dir / "lora")
    config = parse_lora_config({**meta["lora_config"], **config_changes})
    generator = torch.Generator().manual_seed(7)
    other = {}
    for key, value in tensors.items():
        shape = list(value.shape)
        shape[0 if key.endswith("lora_A") else 1] = config.r
        other[key] = torch.randn(shape, generator=generator) * value.std()
    return save_lora_dir(folder, other, config, (preset_dir / "base").resolve())


def test_official_adapter_loads_fully_and_reproduces_the_reference(preset_dir):
    expected = reference_tensors(preset_dir)["gen.lora.noprompt.wav"][0].numpy()
    tts = VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="float32")
    loaded, skipped = tts.load_lora(preset_dir / "lora")
    adapter, _ = load_lora_dir(preset_dir / "lora")
    assert skipped == [] and sorted(loaded) == sorted(adapter)
    wav = _speak(tts, preset_dir)
    assert wav.shape == expected.shape and np.abs(wav - expected).max() < 1e-4


def test_swapping_equals_a_fresh_load_and_keeps_the_base_weights(preset_dir, tmp_path, monkeypatch):
    other = _other_adapter(preset_dir, tmp_path / "b")
    tts = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32")
    wav_a = _speak(tts, preset_dir)
    base_weights = {
        k: (v.data_ptr(), v.clone()) for k, v in tts.model.state_dict().items() if "lora_" not in k
    }

    def no_reload(*args, **kwargs):
        raise AssertionError("a LoRA swap must not reload the base model")

    monkeypatch.setattr(api, "load_model_dir", no_reload)
    loaded, skipped = tts.load_lora(other)
    monkeypatch.undo()
    assert skipped == [] and len(loaded) == len(load_lora_dir(other)[0])
    wav_b = _speak(tts, preset_dir)
    for key, value in tts.model.state_dict().items():
        if "lora_" not in key:
            assert value.data_ptr() == base_weights[key][0] and torch.equal(value, base_weights[key][1]), key

    fresh = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=other, device="cpu", dtype="float32")
    assert np.array_equal(wav_b, _speak(fresh, preset_dir))
    assert _differs(wav_b, wav_a)  # B really is another adapter
    state = tts.get_lora_state_dict()
    assert all(torch.equal(state[k], v) for k, v in load_lora_dir(other)[0].items())

    tts.load_lora(preset_dir / "lora")  # and back
    assert np.array_equal(_speak(tts, preset_dir), wav_a)


def test_disable_and_unload_give_the_base_model(preset_dir):
    tts = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32")
    with_lora = _speak(tts, preset_dir)
    assert _differs(with_lora, _base_wav(preset_dir))
    tts.set_lora_enabled(False)
    assert not tts.lora_enabled
    off = _speak(tts, preset_dir)
    assert off.shape == _base_wav(preset_dir).shape and np.abs(off - _base_wav(preset_dir)).max() <= 1e-6
    tts.set_lora_enabled(True)
    assert tts.lora_enabled
    assert np.array_equal(_speak(tts, preset_dir), with_lora)
    tts.unload_lora()
    assert tts.lora_enabled  # the structure stays, its update is zero
    unloaded = _speak(tts, preset_dir)
    assert (
        unloaded.shape == _base_wav(preset_dir).shape
        and np.abs(unloaded - _base_wav(preset_dir)).max() <= 1e-6
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(r=2), r"rank 2.*r=4"),
        (dict(alpha=16), r"alpha=16 but the LoRA structure it is loaded into uses alpha=8"),
        (dict(enable_proj=False), r"match no LoRA layer|no tensors for"),
    ],
)
def test_an_adapter_of_another_structure_is_a_clear_error(preset_dir, tmp_path, change, message):
    tts = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32")
    before = tts.get_lora_state_dict()
    other = _other_adapter(preset_dir, tmp_path / "other", **change)
    if not change.get("enable_proj", True):  # drop the projection tensors, as training without them would
        tensors, meta = load_lora_dir(other)
        kept = {k: v for k, v in tensors.items() if "." in k.removesuffix(".lora_A").removesuffix(".lora_B")}
        save_lora_dir(other, kept, parse_lora_config(meta["lora_config"]), meta["base_model"], overwrite=True)
    with pytest.raises(VoxCPMError, match=message):
        tts.load_lora(other)
    after = tts.get_lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_lora_config_given_explicitly_must_match_the_adapter(preset_dir):
    wrong = LoRAConfig(enable_lm=True, enable_dit=True, enable_proj=True, r=8, alpha=16)
    with pytest.raises(VoxCPMError, match=r"rank 4.*r=8"):
        VoxCPM.from_pretrained(
            preset_dir / "base", lora_config=wrong, lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32"
        )
