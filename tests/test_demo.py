"""The embedded demo: built once on first use of conf/demo/*.yaml, with speech or a synthetic fallback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import REPO

from voxcpm_core.data.audio import audio_info, load_audio
from voxcpm_core.data.manifest import read_manifest
from voxcpm_core.dev import demo
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.checkpoint import read_model_config
from voxcpm_core.training.config import check_sample_rate, load_train_config


def test_demo_config_builds_the_demo_once(tmp_path):
    conf = tmp_path / "conf" / "demo"
    conf.mkdir(parents=True)
    shutil.copy(
        REPO / "conf/demo/lora.yaml", conf / "lora.yaml"
    )  # its ../../.cache/demo is now under tmp_path
    cfg = load_train_config(conf / "lora.yaml")
    root = tmp_path / ".cache" / "demo"
    assert cfg.demo == root and cfg.pretrained_path == root / "model"
    assert check_sample_rate(cfg, read_model_config(cfg.pretrained_path)) == demo.SAMPLE_RATE

    train, val = read_manifest(cfg.train_manifest), read_manifest(cfg.val_manifest)
    assert (len(train), len(val)) == (len(demo.TRAIN_TEXTS), len(demo.VAL_TEXTS)) == (20, 2)
    assert {e.dataset_id for e in train} == {0, 1}  # English and Chinese
    assert any("你好" in e.text for e in train) and any("Hello" in e.text for e in train)
    for entry in train[:3] + val:
        info = audio_info(entry.audio)
        assert info.sample_rate == demo.SAMPLE_RATE and 0.5 < info.duration < 6

    marker = root / demo.MARKER
    stamp = marker.stat().st_mtime_ns
    load_train_config(conf / "lora.yaml")
    assert marker.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in root.parent.iterdir()] == ["demo"]  # no temporary folders left


def test_synthetic_clips_without_espeak(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    built = demo.ensure_demo(tmp_path / "demo")
    assert built.voice == "synthetic" and "espeak-ng not found" in caplog.text
    assert json.loads((built.root / demo.MARKER).read_text())["voice"] == "synthetic"
    lengths = set()
    for entry in read_manifest(built.train_manifest)[:4]:
        wav = load_audio(entry.audio, demo.SAMPLE_RATE)
        assert 0.1 < np.abs(wav).max() <= 1.0 and np.isfinite(wav).all()
        lengths.add(len(wav))
    assert len(lengths) > 1  # clip length follows the text


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(VoxCPMError, match="not a complete demo folder"):
        demo.ensure_demo(root)
    assert (root / "mine.txt").read_text() == "keep me"


def test_espeak_speech_when_available():
    if shutil.which(demo.ESPEAK) is None:
        pytest.skip("espeak-ng is not installed")
    wav = demo._espeak("你好", "cmn")
    assert wav.dtype == np.float32 and len(wav) > 0.3 * demo.SAMPLE_RATE and np.abs(wav).max() > 0.05
