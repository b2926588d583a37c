"""The embedded demo: a tiny random-weight model and a small speech dataset, built on first use.

``ensure_demo(root)`` makes, once, in ``root``::

    model/        a tiny VoxCPM-0.5B-like model directory (16 kHz VAE, random weights, seed 0)
    clips/*.wav   20 training + 2 validation clips of English and Chinese speech at 16 kHz
    train.jsonl   val.jsonl   manifests (audio paths relative to the manifest's folder)
    demo.json     what was built; its presence marks a complete demo folder

Speech comes from espeak-ng (``-v en`` / ``-v cmn``). Without espeak-ng the clips are synthetic
vowel-like sounds (harmonic tones shaped by formants), and a warning says so. Everything is built
in a temporary sibling folder and renamed into place, so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxcpm_core.data.audio import load_audio, write_wav
from voxcpm_core.dev.builder import build_model_dir, tiny_config
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.atomic import atomic_dir

log = logging.getLogger("voxcpm.demo")

SAMPLE_RATE = 16000
MARKER = "demo.json"
ESPEAK = "espeak-ng"
TRAIN_TEXTS = [
    ("en", "Hello, this is a tiny demo."),
    ("en", "The weather is nice today."),
    ("en", "Please open the window."),
    ("en", "I would like a cup of tea."),
    ("en", "We will meet at the station."),
    ("en", "The cat sleeps on the sofa."),
    ("en", "Learning to speak takes time."),
    ("en", "Thank you for your help."),
    ("en", "This voice was made by a machine."),
    ("en", "Good morning, how are you?"),
    ("cmn", "你好，欢迎使用语音合成。"),
    ("cmn", "今天天气很好。"),
    ("cmn", "请把窗户打开。"),
    ("cmn", "我想喝一杯茶。"),
    ("cmn", "我们在车站见面。"),
    ("cmn", "小猫在沙发上睡觉。"),
    ("cmn", "学习说话需要时间。"),
    ("cmn", "谢谢你的帮助。"),
    ("cmn", "这个声音是机器做的。"),
    ("cmn", "早上好，你好吗？"),
]
VAL_TEXTS = [("en", "See you tomorrow."), ("cmn", "明天见。")]
# (F1, F2, F3) in Hz of a few vowels, for the synthetic fallback.
FORMANTS = [(730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240)]


@dataclass(frozen=True)
class Demo:
    root: Path
    model_dir: Path
    train_manifest: Path
    val_manifest: Path
    voice: str  # "espeak-ng" or "synthetic"


def _demo(root: Path, voice: str) -> Demo:
    return Demo(root, root / "model", root / "train.jsonl", root / "val.jsonl", voice)


def ensure_demo(root: str | os.PathLike) -> Demo:
    """The demo in ``root``, building it first if it is not there yet (idempotent, atomic)."""
    root = Path(root).expanduser().resolve()
    marker = root / MARKER
    if marker.is_file():
        return _demo(root, json.loads(marker.read_text())["voice"])
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise VoxCPMError(
            f"{root}: exists but is not a complete demo folder (no {MARKER}); remove it to rebuild the demo"
        )
    try:
        with atomic_dir(root) as tmp:
            _build(tmp)
    except VoxCPMError:
        if not marker.is_file():  # not another process (a DDP rank) finishing first: a real failure
            raise
    return _demo(root, json.loads(marker.read_text())["voice"])


def _build(folder: Path) -> str:
    log.info("building the demo model and dataset in %s", folder)
    build_model_dir(folder / "model", tiny_config(SAMPLE_RATE), seed=0)
    voice = ESPEAK if shutil.which(ESPEAK) else "synthetic"
    if voice == "synthetic":
        log.warning(
            "espeak-ng not found: the demo dataset uses synthetic vowel-like clips (install espeak-ng for speech)"
        )
    rng = np.random.default_rng(0)
    for split, texts in (("train", TRAIN_TEXTS), ("val", VAL_TEXTS)):
        lines = []
        for i, (lang, text) in enumerate(texts):
            rel = f"clips/{split}_{i:02d}_{lang}.wav"
            wav = _espeak(text, lang) if voice == ESPEAK else _vowels(text, lang, rng)
            write_wav(folder / rel, wav, SAMPLE_RATE)
            lines.append(
                json.dumps({"audio": rel, "text": text, "dataset_id": int(lang == "cmn")}, ensure_ascii=False)
            )
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    info = {
        "voice": voice,
        "sample_rate": SAMPLE_RATE,
        "train_clips": len(TRAIN_TEXTS),
        "val_clips": len(VAL_TEXTS),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return voice


def _espeak(text: str, lang: str) -> np.ndarray:
    """Speech for ``text`` from espeak-ng, mono float32 at the demo rate."""
    with tempfile.TemporaryDirectory(prefix="voxcpm-demo-") as scratch:
        out = Path(scratch) / "speech.wav"
        try:
            subprocess.run(
                [ESPEAK, "-v", lang, "-s", "160", "-w", str(out), text],
                check=True,
                capture_output=True,
                timeout=60,
            )
            return load_audio(out, SAMPLE_RATE)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise VoxCPMError(
                f"espeak-ng failed for {text!r} ({exc}); reinstall espeak-ng or uninstall it to use synthetic clips"
            ) from None


def _vowels(text: str, lang: str, rng: np.random.Generator) -> np.ndarray:
    """A vowel-like stand-in for speech: one syllable per word (English) or character (Chinese)."""
    units = len(text.split()) if lang == "en" else sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    syllable = int(0.22 * SAMPLE_RATE)
    n = max(units, 1) * syllable
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(110, 190) * (1.15 - 0.3 * t / t[-1])  # a falling pitch contour [n]
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    vowel = rng.integers(len(FORMANTS), size=max(units, 1)).repeat(syllable)  # which vowel at each sample
    formants = np.array(FORMANTS, dtype=np.float64)[vowel]  # [n, 3]
    wav = np.zeros(n)
    for k in range(1, 4000 // 110):
        freq = k * f0  # [n]
        gain = (1 / (1 + ((freq[:, None] - formants) / 90.0) ** 2)).sum(axis=1)  # resonance peaks
        wav += gain * np.sin(k * phase) * (freq < 4000)
    envelope = np.tile(np.sin(np.linspace(0, np.pi, syllable)) ** 0.5, max(units, 1))
    wav = wav * envelope
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)
