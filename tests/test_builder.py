"""Random-weight model directories: the tiny tokenizer, tiny configs and the official layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from voxcpm_core.config import parse_model_config
from voxcpm_core.data.tokenizer import AUDIO_END, AUDIO_START, TextTokenizer
from voxcpm_core.dev.builder import build_like, build_model_dir, build_tiny_tokenizer, tiny_config
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.families import FAMILIES
from voxcpm_core.io.checkpoint import load_model_dir, read_config_dict
from voxcpm_core.models.voxcpm import VoxCPMModel


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    folder = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return TextTokenizer.from_files(folder / "tokenizer.json", folder / "tokenizer_config.json")


def test_tiny_tokenizer_is_small_and_keeps_the_audio_ids(tokenizer):
    assert tokenizer.vocab_size < 2000
    ids = {
        "<|audio_start|>": AUDIO_START,
        "<|audio_end|>": AUDIO_END,
        "<|audio_prompt_start|>": 103,  # the released tokenizers' prompt-audio ids (the model never reads them)
        "<|audio_prompt_end|>": 104,
    }
    for token, token_id in ids.items():
        assert tokenizer.token_id(token) == token_id
        assert tokenizer.encode(f"a{token}") == [
            tokenizer.token_id("\u2581"),
            tokenizer.token_id("a"),
            token_id,
        ]


def test_tiny_tokenizer_covers_english_and_chinese_without_unknowns(tokenizer):
    for text in ["Hello world.", "你好，世界！", "Mixed 中文 text, 123?", "naïve €"]:
        ids = tokenizer.encode(text)
        assert ids and 0 not in ids, text  # 0 = <unk>; rare characters use the byte fallback
    hello = tokenizer.encode("你好")  # a multi-character CJK entry is split into its characters
    assert hello[1:] == [tokenizer.token_id("你"), tokenizer.token_id("好")]


@pytest.mark.parametrize("sample_rate, hop, patch", [(16000, 640, 2), (44100, 1764, 4)])
def test_tiny_configs_are_valid(sample_rate, hop, patch):
    config = parse_model_config(tiny_config(sample_rate))
    assert (config.sample_rate, config.hop_length, config.patch_size) == (sample_rate, hop, patch)
    with pytest.raises(VoxCPMError, match="use 16000 or 44100"):
        tiny_config(22050)


def test_built_directory_loads_and_depends_on_the_seed(tmp_path):
    a = load_model_dir(build_model_dir(tmp_path / "a", tiny_config(), seed=0))
    b = load_model_dir(build_model_dir(tmp_path / "b", tiny_config(), seed=0))
    c = load_model_dir(build_model_dir(tmp_path / "c", tiny_config(), seed=1))
    weight = "base_lm.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.model.state_dict()[weight], b.model.state_dict()[weight])
    assert not torch.equal(a.model.state_dict()[weight], c.model.state_dict()[weight])
    assert a.tokenizer.encode("Hello") == c.tokenizer.encode("Hello")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "audiovae.pth",
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_building_and_loading_go_through_the_family_registry(tmp_path, monkeypatch):
    built = []

    class Recorded(VoxCPMModel):
        def __init__(self, config):
            super().__init__(config)
            built.append(config.architecture)

    monkeypatch.setitem(FAMILIES, "voxcpm", dataclasses.replace(FAMILIES["voxcpm"], network=Recorded))
    out = build_model_dir(tmp_path / "m", tiny_config())
    assert type(load_model_dir(out).model) is Recorded and built == ["voxcpm", "voxcpm"]
    with pytest.raises(VoxCPMError, match=r"^config: unknown architecture 'voxcpm3'; known architectures: voxcpm, voxcpm2;"):
        build_model_dir(tmp_path / "v3", tiny_config() | {"architecture": "voxcpm3"})
    assert not (tmp_path / "v3").exists()


def test_the_voxcpm_entry_names_its_batch_collate_and_generation_modes():
    family = FAMILIES["voxcpm"]
    batch = family.collate([([5, 6], torch.zeros(3, 2, 16), 0)])
    assert isinstance(batch, family.batch) and batch.audio_feats.shape == (1, 7, 2, 16)
    assert family.generation_modes == ("zero-shot", "continuation")  # no reference-audio mode before VoxCPM2


def test_vocab_must_cover_the_tiny_tokenizer(tmp_path):
    config = tiny_config()
    config["lm_config"]["vocab_size"] = 100
    with pytest.raises(VoxCPMError, match="vocab_size 100 is smaller than the tiny tokenizer"):
        build_model_dir(tmp_path / "m", config)
    assert not (tmp_path / "m").exists()


def test_build_like_copies_config_and_tokenizer(tmp_path):
    source = tmp_path / "source"
    build_tiny_tokenizer(source)
    config = tiny_config(44100) | {"dtype": "bfloat16", "future_field": 1}
    (source / "config.json").write_text(json.dumps(config))
    out = build_like(source, tmp_path / "twin", seed=3)
    assert read_config_dict(out) == config  # unknown keys survive
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert next(load_model_dir(out, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
