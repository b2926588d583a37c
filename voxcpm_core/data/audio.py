"""Audio files: header info, load as mono float32 at a target rate (soxr), atomic WAV writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.atomic import atomic_write

WAV_FORMATS = frozenset({"WAV", "WAVEX", "RF64"})
MAX_CHANNELS = 8  # more is a [channels, samples] array passed the wrong way round


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says; nothing is decoded."""

    frames: int
    sample_rate: int
    channels: int
    format: str  # container, e.g. "WAV", "FLAC"
    subtype: str  # sample encoding, e.g. "PCM_16", "FLOAT"

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    @property
    def is_wav(self) -> bool:
        return self.format in WAV_FORMATS


def _unreadable(path: Path, exc: Exception) -> VoxCPMError:
    reason = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__  # libsndfile's own words
    return VoxCPMError(f"{path}: not readable audio ({reason}); convert it to WAV, e.g. with ffmpeg or sox")


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Frames, sample rate, channels and format from the header of ``path``."""
    path = Path(path)
    try:
        with sf.SoundFile(path) as f:
            info = AudioInfo(int(f.frames), int(f.samplerate), int(f.channels), f.format, f.subtype)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        raise _unreadable(path, exc) from None
    if info.sample_rate <= 0 or info.channels <= 0:
        raise VoxCPMError(
            f"{path}: header says {info.sample_rate} Hz, {info.channels} channels; the file is corrupt"
        )
    return info


def load_audio(path: str | os.PathLike, target_sr: int) -> np.ndarray:
    """Decode ``path`` to mono float32 [samples] at ``target_sr`` (channels averaged, soxr resampling)."""
    path = Path(path)
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)  # [samples, channels]
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        raise _unreadable(path, exc) from None
    mono = wav.mean(axis=1, dtype=np.float32)  # [samples]
    if sr != target_sr and mono.size:
        mono = soxr.resample(mono, sr, target_sr)
    return np.ascontiguousarray(mono, dtype=np.float32)


def write_wav(path: str | os.PathLike, wav, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write ``wav`` ([samples] or [samples, channels], floats in [-1, 1]) as a WAV file, atomically.

    ``subtype`` is ``"PCM_16"`` (floats are clipped to [-1, 1]) or ``"FLOAT"``.
    """
    if subtype not in ("PCM_16", "FLOAT"):
        raise VoxCPMError(f"write_wav: subtype {subtype!r} is not supported; use 'PCM_16' or 'FLOAT'")
    path = Path(path)
    data = np.asarray(wav)
    if data.ndim not in (1, 2) or (data.ndim == 2 and data.shape[1] > MAX_CHANNELS):
        raise VoxCPMError(
            f"{path}: audio must be [samples] or [samples, channels], got shape {tuple(data.shape)}"
        )
    if np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float32, copy=False)
        if subtype == "PCM_16":
            data = np.clip(data, -1.0, 1.0)
    try:
        return atomic_write(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype=subtype, format="WAV"))
    except (sf.LibsndfileError, OSError) as exc:
        raise VoxCPMError(
            f"{path}: cannot write audio ({exc}); check the folder exists and is writable"
        ) from None
