"""Helpers that write real audio files and manifests for the data tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf


def write_clip(
    path: Path,
    seconds: float = 1.0,
    sample_rate: int = 16000,
    channels: int = 1,
    amplitude: float = 0.3,
    subtype: str = "PCM_16",
    frequency: float = 220.0,
    format: str | None = None,
) -> Path:
    """A sine tone (each channel a different frequency) written with soundfile."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    wav = np.stack([amplitude * np.sin(2 * np.pi * frequency * (c + 1) * t) for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav.astype(np.float32), sample_rate, subtype=subtype, format=format)
    return path


def espeak_clip(path: Path, text: str) -> Path | None:
    """Real speech from espeak-ng (22.05 kHz mono WAV), or None when espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def write_manifest(path: Path, rows: list) -> Path:
    """One line per row: dicts/lists become JSON, strings are written as they are."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
