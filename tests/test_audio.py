"""voxcpm_core.data.audio: header info, mono/resampled loading and atomic WAV writes, on real files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from wavs import espeak_clip, write_clip

from voxcpm_core.data.audio import audio_info, load_audio, write_wav
from voxcpm_core.errors import VoxCPMError


def _peak_hz(wav: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav))
    return float(np.fft.rfftfreq(len(wav), 1 / sample_rate)[spectrum.argmax()])


def test_audio_info_reads_the_header(tmp_path):
    info = audio_info(write_clip(tmp_path / "a.wav", seconds=1.5, sample_rate=22050, channels=2))
    assert (info.frames, info.sample_rate, info.channels) == (33075, 22050, 2)
    assert info.duration == pytest.approx(1.5)
    assert (info.format, info.subtype, info.is_wav) == ("WAV", "PCM_16", True)

    flac = audio_info(write_clip(tmp_path / "a.flac", seconds=0.5))
    assert (flac.format, flac.is_wav, flac.frames) == ("FLAC", False, 8000)


@pytest.mark.parametrize("content", [None, b"", b"RIFF\x00\x00garbage" * 50])
def test_audio_info_bad_files_raise_one_line(tmp_path, content):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VoxCPMError) as err:
        audio_info(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_load_audio_mixes_channels_to_mono(tmp_path):
    left = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    right = np.full(1000, 0.25, dtype=np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    wav = load_audio(path, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("source_sr, target_sr", [(22050, 16000), (48000, 16000), (16000, 44100)])
def test_load_audio_resamples_keeping_pitch(tmp_path, source_sr, target_sr):
    path = write_clip(tmp_path / "tone.wav", seconds=1.0, sample_rate=source_sr, frequency=440.0)
    wav = load_audio(path, target_sr)
    assert wav.dtype == np.float32
    assert len(wav) == target_sr  # 1 s at the new rate
    assert _peak_hz(wav, target_sr) == pytest.approx(440.0, abs=2.0)
    assert np.abs(wav).max() == pytest.approx(0.3, abs=0.02)


def test_load_audio_unreadable_raises(tmp_path):
    path = tmp_path / "x.wav"
    path.write_text("not audio")
    with pytest.raises(VoxCPMError, match="not readable audio"):
        load_audio(path, 16000)


def test_write_wav_pcm16_round_trip_clips_and_leaves_no_temp_files(tmp_path):
    wav = np.array([0.0, 0.5, -0.5, 1.7, -3.0], dtype=np.float32)
    path = write_wav(tmp_path / "out" / "a.wav", wav, 16000)
    back, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and sf.info(path).subtype == "PCM_16"
    np.testing.assert_allclose(back, np.clip(wav, -1, 1), atol=1 / 32767)
    assert [p.name for p in path.parent.iterdir()] == ["a.wav"]


def test_write_wav_float_is_exact_and_replaces_atomically(tmp_path):
    path = tmp_path / "a.wav"
    write_wav(path, np.zeros(10, dtype=np.float32), 16000)
    wav = np.random.default_rng(0).uniform(-1, 1, size=(400, 2)).astype(np.float32)
    write_wav(path, wav, 24000, subtype="FLOAT")
    back, sr = sf.read(path, dtype="float32")
    assert sr == 24000
    np.testing.assert_array_equal(back, wav)


def test_write_wav_failure_keeps_the_old_file(tmp_path):
    path = write_wav(tmp_path / "a.wav", np.full(100, 0.1, dtype=np.float32), 16000)
    before = path.read_bytes()
    for wrong_shape in (np.zeros((2, 3, 4)), np.zeros((1, 100))):  # [1, T] is [channels, samples]
        with pytest.raises(VoxCPMError, match="samples"):
            write_wav(path, wrong_shape, 16000)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VoxCPMError, match="cannot write"):
        write_wav(blocker / "b.wav", np.zeros(10), 16000)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "file"]


def test_espeak_speech_loads_at_the_model_rate(tmp_path):
    path = espeak_clip(tmp_path / "speech.wav", "Checking the audio loader with real speech.")
    if path is None:
        pytest.skip("espeak-ng not installed")
    info = audio_info(path)
    wav = load_audio(path, 16000)
    assert len(wav) == round(info.frames * 16000 / info.sample_rate)
    assert 0.05 < np.abs(wav).max() <= 1.0
