"""VoxCPM2 generation against the official reference runs of ``v2-tiny`` (``gen.*``): the four modes, voice design,
the short-prompt combined case, LoRA, streaming, the Python API and `voxcpm infer --reference-audio`.

Reference runs: torch.manual_seed(sub_seeds.generate), min_len 2, max_len 8, 4 timesteps, cfg 2.0, float32.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import official_dir
from reference_data import reference_tensors

from voxcpm_core.api import VoxCPM
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.generation import sampling as inference

ATOL = 1e-4  # generation compounds ~1e-7 float differences over the AR steps
# run -> (text key, prompt file or None, with the reference clip)
RUNS = {
    "base.zero_shot": ("zero_shot", None, False),
    "base.voice_design": ("voice_design", None, False),
    "base.continuation": ("target", "prompt.wav", False),
    "base.reference": ("target", None, True),
    "base.combined": ("target", "prompt.wav", True),
    "base.combined_short_prompt": ("target", "prompt_short.wav", True),
    "lora.zero_shot": ("zero_shot", None, False),
    "lora.combined": ("target", "prompt.wav", True),
}


@pytest.fixture
def v2() -> Path:
    return official_dir("v2-tiny")


@functools.cache
def _tts(preset: Path, lora: bool) -> VoxCPM:
    adapter = dict(lora_weights_path=preset / "lora") if lora else {}
    return VoxCPM.from_pretrained(preset / "base", device="cpu", dtype="float32", optimize=False, **adapter)


def _info(preset: Path) -> dict:
    return json.loads((preset / "reference.json").read_text())


def _seed(preset: Path) -> int:
    return _info(preset)["sub_seeds"]["generate"]


def _kwargs(preset: Path) -> dict:
    return _info(preset)["generation"]["kwargs"]


def _options(preset: Path) -> inference.SamplingOptions:
    return inference.SamplingOptions(**_kwargs(preset), retry_badcase=False)


def _request(preset: Path, run: str):
    """(tts, target text, Prompt or None, Reference or None) of a reference run."""
    text_key, prompt_file, with_reference = RUNS[run]
    tts = _tts(preset, run.startswith("lora."))
    texts, m = _info(preset)["generation"]["texts"], tts.loaded
    prompt = None
    if prompt_file is not None:
        prompt = inference.load_prompt(m.vae, preset / prompt_file, texts["prompt_text"], m.config.patch_size)
    reference = inference.load_reference(m.vae, preset / "reference.wav", m.config.patch_size) if with_reference else None
    return tts, texts[text_key], prompt, reference


def _api_voice(preset: Path, run: str) -> dict:
    _, prompt_file, with_reference = RUNS[run]
    voice = {}
    if prompt_file is not None:
        voice |= dict(prompt_wav_path=preset / prompt_file, prompt_text=_info(preset)["generation"]["texts"]["prompt_text"])
    if with_reference:
        voice["reference_wav_path"] = preset / "reference.wav"
    return voice


def _close(actual, expected, atol: float = ATOL) -> None:
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


# ---- clips and the `_inference` inputs ------------------------------------------------------------


def test_prompt_left_padded_and_reference_right_padded(v2):
    ref = reference_tensors(v2)
    _, _, prompt, reference = _request(v2, "base.combined")
    _close(prompt.patches, ref["gen.prompt_cache.audio_feat"], atol=1e-5)
    _close(reference.patches, ref["gen.prompt_cache.ref_audio_feat"], atol=1e-5)


@pytest.mark.parametrize("run", RUNS)
def test_inference_inputs_match_reference(v2, run):
    tts, text, prompt, reference = _request(v2, run)
    cfg, ref = tts.loaded.config, reference_tensors(v2)
    inputs = inference.prepare_inputs(tts.loaded.tokenizer, text, prompt, cfg.patch_size, cfg.feat_dim, reference)
    assert inputs.text_tokens.tolist() == ref[f"gen.{run}.in.text_token"].tolist()
    assert inputs.text_mask.tolist() == ref[f"gen.{run}.in.text_mask"].tolist()
    assert inputs.feat_mask.tolist() == ref[f"gen.{run}.in.feat_mask"].tolist()
    _close(inputs.feats, ref[f"gen.{run}.in.feat"], atol=1e-5)


# ---- the AR loop, the decoded latent and the waveform ---------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_decode_steps_and_latent_match_reference(v2, run):
    tts, text, prompt, reference = _request(v2, run)
    m, ref, opts = tts.loaded, reference_tensors(v2), _options(v2)
    inputs = inference.prepare_inputs(m.tokenizer, text, prompt, m.config.patch_size, m.config.feat_dim, reference)
    max_len = inference.max_patches(inputs.target_tokens, opts.max_len)
    generator = torch.Generator().manual_seed(_seed(v2))
    steps = list(inference.decode_steps(m.model, inputs, opts, max_len, generator))

    run_info = _info(v2)["generation"]["runs"][run]
    assert len(steps) == run_info["n_steps"]
    stack = lambda attr: torch.stack([getattr(s, attr) for s in steps])  # noqa: E731
    assert torch.equal(stack("noise"), ref[f"gen.{run}.step.z"])
    _close(stack("mu"), ref[f"gen.{run}.step.mu"])
    _close(stack("lm_hidden"), ref[f"gen.{run}.step.lm_hidden"])
    _close(stack("residual_hidden"), ref[f"gen.{run}.step.residual_hidden"])
    _close(stack("stop_logits"), ref[f"gen.{run}.step.stop_logits"])
    _close(stack("patch").transpose(1, 2)[:, None], ref[f"gen.{run}.step.pred"])

    # what the VAE decodes: the context patches (the last <= 3 audio positions of a prefix ending in audio), then the new ones
    context = inputs.context(3)
    assert len(context) == run_info["context_patches"]
    patches = torch.cat([context, stack("patch")])
    _close(patches.permute(2, 0, 1).flatten(1)[None], ref[f"gen.{run}.latent"])


@pytest.mark.parametrize("run", RUNS)
def test_generate_matches_reference_wav_at_the_output_rate(v2, run):
    tts, text, prompt, reference = _request(v2, run)
    m = tts.loaded
    result = inference.generate(m.model, m.vae, m.tokenizer, text, prompt, _options(v2), _seed(v2), reference)
    assert result.sample_rate == 48000 and result.wav.dtype == np.float32
    _close(result.wav, reference_tensors(v2)[f"gen.{run}.wav"][0])


@pytest.mark.parametrize("run", ["base.zero_shot", "base.continuation", "base.reference", "base.combined_short_prompt"])
def test_streaming_equals_non_streaming_in_every_mode(v2, run):
    tts, text, prompt, reference = _request(v2, run)
    m, opts, seed = tts.loaded, _options(v2), _seed(v2)
    whole = inference.generate(m.model, m.vae, m.tokenizer, text, prompt, opts, seed, reference)
    chunks = list(inference.generate_streaming(m.model, m.vae, m.tokenizer, text, prompt, opts, seed, reference))
    assert len(chunks) == whole.patches
    assert all(len(c) == m.config.out_patch_samples for c in chunks)
    _close(np.concatenate(chunks), whole.wav, atol=1e-5)
    stored = reference_tensors(v2).get(f"gen.{run}.stream_wav")
    if run == "base.continuation":  # the reference's streamed audio starts from zero state: it differs from its own wav
        assert (stored[0] - torch.from_numpy(whole.wav)).abs().max() > 0.1


def test_reference_mode_needs_voxcpm2(tmp_path):
    v15 = official_dir("v15-tiny")
    tts = _tts(v15, False)
    with pytest.raises(VoxCPMError, match="reference audio needs a VoxCPM2 model"):
        tts.generate("Hi.", reference_wav_path=v15 / "prompt.wav")
    v2 = official_dir("v2-tiny")
    with pytest.raises(VoxCPMError, match="reference audio file not found"):
        _tts(v2, False).generate("Hi.", reference_wav_path=tmp_path / "missing.wav")


# ---- Python API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["base.voice_design", "base.reference", "base.combined", "lora.combined"])
def test_api_generate_matches_reference(v2, run):
    text_key, _, _ = RUNS[run]
    tts = _tts(v2, run.startswith("lora."))
    text = _info(v2)["generation"]["texts"][text_key]
    voice, kwargs, seed = _api_voice(v2, run), _kwargs(v2), _seed(v2)
    wav = tts.generate(text, **voice, seed=seed, retry_badcase=False, **kwargs)
    assert tts.sample_rate == 48000
    _close(wav, reference_tensors(v2)[f"gen.{run}.wav"][0])
    _close(np.concatenate(list(tts.generate_streaming(text, **voice, seed=seed, **kwargs))), wav, atol=1e-5)


def test_api_lora_hot_swap_with_fusion_adapter(v2):
    ref, seed, kwargs = reference_tensors(v2), _seed(v2), _kwargs(v2)
    text = _info(v2)["generation"]["texts"]["zero_shot"]
    tts = VoxCPM.from_pretrained(v2 / "base", device="cpu", dtype="float32")
    speak = lambda: tts.generate(text, seed=seed, retry_badcase=False, **kwargs)  # noqa: E731
    _close(speak(), ref["gen.base.zero_shot.wav"][0])
    loaded, _ = tts.load_lora(v2 / "lora")
    assert any(key.startswith("fusion_concat_proj.") for key in loaded)
    _close(speak(), ref["gen.lora.zero_shot.wav"][0])
    tts.set_lora_enabled(False)
    _close(speak(), ref["gen.base.zero_shot.wav"][0])


# ---- `voxcpm infer` -----------------------------------------------------------------------------


@pytest.mark.parametrize("run", [run for run in RUNS if run.startswith("base.")])
def test_cli_infer_reproduces_every_mode(v2, tmp_path, run):
    """The issue's done-when: the installed `voxcpm` entry point reproduces each stored waveform."""
    text_key, prompt_file, with_reference = RUNS[run]
    info = _info(v2)
    out = tmp_path / "o.wav"
    voxcpm = shutil.which("voxcpm")
    cmd = [voxcpm] if voxcpm else [sys.executable, "-m", "voxcpm_cli"]
    cmd += ["infer", "--ckpt-dir", str(v2 / "base"), "--text", info["generation"]["texts"][text_key],
            "--seed", str(_seed(v2)), "--inference-timesteps", "4", "--cfg-value", "2.0", "--min-len", "2",
            "--max-len", "8", "--no-retry-badcase", "--device", "cpu", "--dtype", "float32", "--output", str(out)]  # fmt: skip
    if prompt_file is not None:
        cmd += ["--prompt-audio", str(v2 / prompt_file), "--prompt-text", info["generation"]["texts"]["prompt_text"]]
    if with_reference:
        cmd += ["--reference-audio", str(v2 / "reference.wav")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    wav, sr = sf.read(out, dtype="float32")
    assert sr == 48000
    _close(wav, reference_tensors(v2)[f"gen.{run}.wav"][0], atol=1e-3)


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from voxcpm_cli.main import main

    monkeypatch.setattr(sys, "argv", ["voxcpm", *args])
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize(
    "preset, reference, message",
    [
        ("v2-tiny", "{missing}", "reference audio file not found (--reference-audio)"),
        ("v2-tiny", "{garbage}", "garbage.wav"),
        ("v15-tiny", "{prompt}", "reference audio needs a VoxCPM2 model"),
    ],
)
def test_cli_reference_errors_are_one_line(tmp_path, monkeypatch, capsys, preset, reference, message):
    model = official_dir(preset)
    (tmp_path / "garbage.wav").write_bytes(b"not a wav file at all")
    reference = reference.format(missing=tmp_path / "missing.wav", garbage=tmp_path / "garbage.wav", prompt=model / "prompt.wav")
    code, _, err = _run_cli(monkeypatch, capsys, "infer", "--ckpt-dir", str(model / "base"), "--text", "Hi.",
                            "--reference-audio", reference, "--output", str(tmp_path / "x.wav"))  # fmt: skip
    assert code == 1
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.wav").exists()


def test_cli_batch_takes_reference_audio(v2, tmp_path, monkeypatch, capsys):
    info = _info(v2)
    batch = tmp_path / "batch.jsonl"
    lines = [
        {"id": "ref", "text": info["generation"]["texts"]["target"], "reference_audio": str(v2 / "reference.wav")},
        {"id": "plain", "text": info["generation"]["texts"]["zero_shot"]},
    ]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    code, _, err = _run_cli(monkeypatch, capsys, "infer", "--ckpt-dir", str(v2 / "base"), "--batch", str(batch),
                            "--seed", str(_seed(v2)), "--inference-timesteps", "4", "--max-len", "8",
                            "--no-retry-badcase", "--dtype", "float32", "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    ref = reference_tensors(v2)
    for uid, run in (("ref", "base.reference"), ("plain", "base.zero_shot")):
        wav, sr = sf.read(tmp_path / "out" / f"{uid}.wav", dtype="float32")
        assert sr == 48000
        _close(wav, ref[f"gen.{run}.wav"][0], atol=1e-3)
