"""Generation against the official reference runs (``gen.*``), streaming, retries, the Python API and `voxcpm infer`.

Reference runs: torch.manual_seed(sub_seeds.generate), min_len 2, max_len 8, 4 timesteps, cfg 2.0, float32.
"""

from __future__ import annotations

import functools
import importlib.util
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
from reference_data import reference_tensors
from safetensors.torch import load_file

from voxcpm_core.api import VoxCPM
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.generation import sampling as inference
from voxcpm_core.io.checkpoint import load_model_dir
from voxcpm_core.io.hub import resolve_model_dir
from voxcpm_core.models.lora import LoRAConfig, lora_modules

ATOL = 1e-4  # generation compounds ~1e-7 float differences (thread count) over the AR steps
RUNS = {  # run name -> (target text, with the fixture's prompt)
    "noprompt": ("Hello world.", False),
    "prompt_cache": ("Mixed 中文 and English.", True),
}


@functools.cache
def _loaded(preset_dir: Path):
    return load_model_dir(preset_dir / "base", device="cpu", dtype="float32")


def _info(preset_dir: Path) -> dict:
    return json.loads((preset_dir / "reference.json").read_text())


def _seed(preset_dir: Path) -> int:
    return _info(preset_dir)["sub_seeds"]["generate"]


def _options(preset_dir: Path, **overrides) -> inference.SamplingOptions:
    kwargs = _info(preset_dir)["generation"]["kwargs"]
    return inference.SamplingOptions(**{**kwargs, "retry_badcase": False, **overrides})


def _prompt(preset_dir: Path, with_prompt: bool) -> inference.Prompt | None:
    if not with_prompt:
        return None
    m = _loaded(preset_dir)
    text = _info(preset_dir)["generation"]["texts"]["prompt_text"]
    return inference.load_prompt(m.vae, preset_dir / "prompt.wav", text, m.config.patch_size)


def _close(actual, expected, atol: float = ATOL) -> None:
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


# ---- prompt preparation and the `_inference` inputs ---------------------------------------------


def test_prompt_patches_match_reference(preset_dir):
    prompt = _prompt(preset_dir, True)
    _close(prompt.patches, reference_tensors(preset_dir)["gen.prompt_cache.audio_feat"], atol=1e-5)


@pytest.mark.parametrize("run", RUNS)
def test_inference_inputs_match_reference(preset_dir, run):
    text, with_prompt = RUNS[run]
    m, ref = _loaded(preset_dir), reference_tensors(preset_dir)
    inputs = inference.prepare_inputs(
        m.tokenizer, text, _prompt(preset_dir, with_prompt), m.config.patch_size, m.config.feat_dim
    )
    assert inputs.text_tokens.tolist() == ref[f"gen.base.{run}.in.text_token"].tolist()
    assert inputs.text_mask.tolist() == ref[f"gen.base.{run}.in.text_mask"].tolist()
    assert inputs.feat_mask.tolist() == ref[f"gen.base.{run}.in.feat_mask"].tolist()
    _close(inputs.feats, ref[f"gen.base.{run}.in.feat"], atol=1e-5)


def test_text_cleaning_and_max_len_cap():
    assert inference.clean_text("a\nb \t\t c\r\n") == "a b c "
    assert inference.max_patches(target_tokens=3, max_len=4096) == 28  # int(3 * 6 + 10)
    assert inference.max_patches(target_tokens=3, max_len=8) == 8


def test_prompt_any_channels_and_rate(preset_dir, tmp_path):
    m = _loaded(preset_dir)
    wav, sr = sf.read(preset_dir / "prompt.wav", dtype="float32")
    sf.write(tmp_path / "stereo.wav", np.stack([wav, wav], axis=1), sr, subtype="FLOAT")
    mono = inference.load_prompt(m.vae, preset_dir / "prompt.wav", "x", m.config.patch_size)
    stereo = inference.load_prompt(m.vae, tmp_path / "stereo.wav", "x", m.config.patch_size)
    torch.testing.assert_close(stereo.patches, mono.patches)
    sf.write(tmp_path / "half.wav", wav[::2], sr // 2)  # half the VAE rate: soxr resamples it back up
    half = inference.load_prompt(m.vae, tmp_path / "half.wav", "x", m.config.patch_size)
    assert abs(len(half.patches) - len(mono.patches)) <= 1


# ---- the AR loop and the waveform vs the reference ----------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_decode_steps_match_reference(preset_dir, run):
    text, with_prompt = RUNS[run]
    m, ref, info = _loaded(preset_dir), reference_tensors(preset_dir), _info(preset_dir)
    prompt, opts = _prompt(preset_dir, with_prompt), _options(preset_dir)
    inputs = inference.prepare_inputs(m.tokenizer, text, prompt, m.config.patch_size, m.config.feat_dim)
    max_len = inference.max_patches(inputs.target_tokens, opts.max_len)
    generator = torch.Generator().manual_seed(_seed(preset_dir))
    steps = list(inference.decode_steps(m.model, inputs, opts, max_len, generator))

    assert len(steps) == info["generation"]["runs"][f"base.{run}"]["n_steps"]
    stack = lambda attr: torch.stack([getattr(s, attr) for s in steps])  # noqa: E731
    assert torch.equal(stack("noise"), ref[f"gen.base.{run}.step.z"])  # the seed reproduces the noise exactly
    _close(stack("mu"), ref[f"gen.base.{run}.step.mu"])
    _close(stack("lm_hidden"), ref[f"gen.base.{run}.step.lm_hidden"])
    _close(stack("residual_hidden"), ref[f"gen.base.{run}.step.residual_hidden"])
    _close(stack("stop_logits"), ref[f"gen.base.{run}.step.stop_logits"])
    _close(stack("patch").transpose(1, 2)[:, None], ref[f"gen.base.{run}.step.pred"])

    # the latent given to the VAE: (the last 2 prompt patches and) the generated patches, [1, D, frames]
    patches = torch.cat([prompt.patches[-2:], stack("patch")]) if prompt else stack("patch")
    _close(patches.permute(2, 0, 1).flatten(1)[None], ref[f"gen.base.{run}.latent"])


@pytest.mark.parametrize("run", RUNS)
def test_generate_matches_reference_wav(preset_dir, run):
    text, with_prompt = RUNS[run]
    m = _loaded(preset_dir)
    result = inference.generate(
        m.model,
        m.vae,
        m.tokenizer,
        text,
        _prompt(preset_dir, with_prompt),
        _options(preset_dir),
        _seed(preset_dir),
    )
    expected = reference_tensors(preset_dir)[f"gen.base.{run}.wav"][0]
    assert result.wav.dtype == np.float32 and result.sample_rate == m.config.sample_rate
    _close(result.wav, expected)
    assert (result.seed, result.tries) == (_seed(preset_dir), 1)


@pytest.mark.parametrize("run", RUNS)
def test_streaming_chunks_concatenate_to_generate(preset_dir, run):
    text, with_prompt = RUNS[run]
    m, prompt, opts, seed = (
        _loaded(preset_dir),
        _prompt(preset_dir, with_prompt),
        _options(preset_dir),
        _seed(preset_dir),
    )
    whole = inference.generate(m.model, m.vae, m.tokenizer, text, prompt, opts, seed)
    chunks = list(inference.generate_streaming(m.model, m.vae, m.tokenizer, text, prompt, opts, seed))
    assert len(chunks) == whole.patches
    assert all(len(c) == m.config.patch_samples for c in chunks)
    _close(np.concatenate(chunks), whole.wav, atol=1e-5)


def test_decoder_history_covers_the_vae_receptive_field(preset_dir):
    """Decoding the last frame from a window of history frames equals the full decode (here longer than the window)."""
    vae = _loaded(preset_dir).vae
    hop, history = vae.hop_length, inference.decoder_history_frames(vae.config)
    z = torch.randn(1, vae.latent_dim, history + 12, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = vae.decode(z)[0, 0]
        window = vae.decode(z[:, :, -history - 1 :])[0, 0]
        short = vae.decode(z[:, :, -history + 2 :])[0, 0]
    _close(window[-hop:], full[-hop:], atol=1e-6)
    assert (short[-hop:] - full[-hop:]).abs().max() > 1e-6  # less context does change the samples


def test_badcase_retry_uses_next_seeds(preset_dir):
    m = _loaded(preset_dir)
    seed = _seed(preset_dir)
    # "Hello" is 1 token: a run is a bad case at 6 patches; with min_len past max_len no run ever stops
    never_stops = dict(min_len=100, max_len=6, inference_timesteps=2)
    retried = inference.generate(
        m.model, m.vae, m.tokenizer, "Hello", None, _options(preset_dir, retry_badcase=True, **never_stops), seed
    )
    last = inference.generate(m.model, m.vae, m.tokenizer, "Hello", None, _options(preset_dir, **never_stops), seed + 2)
    first = inference.generate(m.model, m.vae, m.tokenizer, "Hello", None, _options(preset_dir, **never_stops), seed)
    assert (retried.tries, retried.patches) == (3, 6)
    np.testing.assert_array_equal(retried.wav, last.wav)
    assert not np.array_equal(retried.wav, first.wav)


def test_invalid_options_and_text_are_clear_errors(preset_dir):
    m = _loaded(preset_dir)
    with pytest.raises(VoxCPMError, match="inference_timesteps"):
        inference.SamplingOptions(inference_timesteps=0)
    with pytest.raises(VoxCPMError, match="empty"):
        inference.generate(m.model, m.vae, m.tokenizer, " \n ", None, _options(preset_dir), 0)


# ---- Python API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_api_generate_matches_reference(preset_dir, run):
    text, with_prompt = RUNS[run]
    tts = VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="float32")
    kwargs = _info(preset_dir)["generation"]["kwargs"]
    prompt = dict(
        prompt_wav_path=preset_dir / "prompt.wav",
        prompt_text=_info(preset_dir)["generation"]["texts"]["prompt_text"],
    )
    wav = tts.generate(
        text, **(prompt if with_prompt else {}), seed=_seed(preset_dir), retry_badcase=False, **kwargs
    )
    assert tts.sample_rate == _loaded(preset_dir).config.sample_rate
    _close(wav, reference_tensors(preset_dir)[f"gen.base.{run}.wav"][0])
    chunks = list(
        tts.generate_streaming(text, **(prompt if with_prompt else {}), seed=_seed(preset_dir), **kwargs)
    )
    _close(np.concatenate(chunks), wav, atol=1e-5)


def test_api_lora_hot_swap(preset_dir):
    ref, seed, kwargs = (
        reference_tensors(preset_dir),
        _seed(preset_dir),
        _info(preset_dir)["generation"]["kwargs"],
    )
    speak = lambda tts: tts.generate("Hello world.", seed=seed, retry_badcase=False, **kwargs)  # noqa: E731
    base_wav, lora_wav = ref["gen.base.noprompt.wav"][0], ref["gen.lora.noprompt.wav"][0]

    tts = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32")
    assert tts.lora_enabled
    _close(speak(tts), lora_wav)
    tts.set_lora_enabled(False)
    assert not tts.lora_enabled  # switched off: the base model speaks
    _close(speak(tts), base_wav)
    tts.set_lora_enabled(True)
    assert tts.lora_enabled
    _close(speak(tts), lora_wav)
    saved = tts.get_lora_state_dict()
    tts.unload_lora()
    _close(speak(tts), base_wav)
    loaded, skipped = tts.load_lora(preset_dir / "lora")
    assert skipped == [] and sorted(loaded) == sorted(saved)
    _close(speak(tts), lora_wav)

    plain = VoxCPM.from_pretrained(
        preset_dir / "base", device="cpu", dtype="float32"
    )  # no LoRA structure yet: taken from the adapter
    assert not plain.lora_enabled and plain.get_lora_state_dict() == {}
    plain.load_lora(preset_dir / "lora")
    _close(speak(plain), lora_wav)


def test_api_lora_structure_mismatch_and_inferred_config(preset_dir, tmp_path):
    wrong_rank = LoRAConfig(enable_lm=True, enable_dit=True, enable_proj=True, r=2)
    with pytest.raises(VoxCPMError, match="rank"):
        VoxCPM.from_pretrained(
            preset_dir / "base", lora_config=wrong_rank, lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32"
        )
    bare = tmp_path / "adapter"
    bare.mkdir()
    shutil.copy(preset_dir / "lora" / "lora_weights.safetensors", bare)  # no lora_config.json
    with pytest.warns(UserWarning, match="alpha"):
        tts = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=bare, device="cpu", dtype="float32")
    official = json.loads((preset_dir / "lora" / "lora_config.json").read_text())["lora_config"]
    layers = dict(lora_modules(tts.model))
    assert set(layers) == {key.rpartition(".")[0] for key in load_file(bare / "lora_weights.safetensors")}
    assert {layer.r for layer in layers.values()} == {official["r"]}


def test_api_from_pretrained_errors(preset_dir, tmp_path, monkeypatch):
    with pytest.raises(VoxCPMError, match="not supported"):
        VoxCPM.from_pretrained(preset_dir / "base", load_denoiser=True)
    with pytest.raises(VoxCPMError, match="exactly one"):
        VoxCPM.from_pretrained(preset_dir / "base", hf_model_id="openbmb/VoxCPM1.5")
    with pytest.raises(VoxCPMError, match="not found"):
        resolve_model_dir(tmp_path / "missing")
    if importlib.util.find_spec("huggingface_hub") is not None:  # the hub extra is installed: offline fails clearly
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(VoxCPMError, match="downloading it from the Hugging Face Hub failed"):
            resolve_model_dir("someone-nonexistent/voxcpm-model")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the hub extra were not installed
    with pytest.raises(VoxCPMError, match=r"voxcpm-tune\[hub\]"):
        resolve_model_dir("someone-nonexistent/voxcpm-model")


def test_api_prompt_needs_both_parts(preset_dir):
    tts = VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="float32")
    with pytest.raises(VoxCPMError, match="without prompt audio"):
        tts.generate("Hi.", prompt_text="Hello.")
    with pytest.raises(VoxCPMError, match="without prompt text"):
        tts.generate("Hi.", prompt_wav_path=preset_dir / "prompt.wav")


# ---- `voxcpm infer` -----------------------------------------------------------------------------


def test_cli_infer_reproduces_reference(tmp_path):
    """The issue's done-when command, run as a new user would (the installed `voxcpm` entry point)."""
    from conftest import official_dir

    preset = official_dir("v15-tiny")
    seed = _seed(preset)
    out = tmp_path / "o.wav"
    voxcpm = shutil.which("voxcpm")
    cmd = [voxcpm] if voxcpm else [sys.executable, "-m", "voxcpm_cli"]
    cmd += ["infer", "--ckpt-dir", str(preset / "base"), "--text", "Hello world.", "--seed", str(seed),
            "--inference-timesteps", "4", "--cfg-value", "2.0", "--max-len", "8", "--no-retry-badcase",
            "--device", "cpu", "--dtype", "float32", "--output", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"}
    )
    assert proc.returncode == 0, proc.stderr
    assert f"seed {seed}" in proc.stdout and "RTF" in proc.stdout
    wav, sr = sf.read(out, dtype="float32")
    assert sr == 44100
    _close(wav, reference_tensors(preset)["gen.base.noprompt.wav"][0], atol=1e-3)


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from voxcpm_cli.main import main

    monkeypatch.setattr(sys, "argv", ["voxcpm", *args])
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_infer_with_prompt_and_drawn_seed(preset_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "clone.wav"
    code, stdout, _ = _run_cli(
        monkeypatch, capsys, "infer", "--ckpt-dir", str(preset_dir / "base"), "--text", "Hi there.",
        "--prompt-audio", str(preset_dir / "prompt.wav"), "--prompt-text", "Hello.", "--inference-timesteps", "2",
        "--max-len", "4", "--device", "cpu", "--output", str(out),
    )  # fmt: skip
    assert code == 0
    assert "seed " in stdout
    info = sf.info(out)
    assert info.samplerate == _loaded(preset_dir).config.sample_rate
    assert (
        3 * _loaded(preset_dir).config.patch_samples
        <= info.frames
        <= 4 * _loaded(preset_dir).config.patch_samples
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt-dir", "{missing}"], "model directory not found"),
        (["--prompt-text", "Hello."], "prompt text given without prompt audio"),
        (["--prompt-audio", "{prompt}"], "prompt audio given without prompt text"),
        (["--prompt-audio", "{missing}.wav", "--prompt-text", "Hello."], "prompt audio file not found"),
        pytest.param(["--device", "cuda"], "device 'cuda' is not available here", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="this machine has CUDA")),  # fmt: skip
        pytest.param(["--device", "cuda"], "(--device cpu)", marks=pytest.mark.skipif(  # the engine's fix, as a flag
            torch.cuda.is_available(), reason="this machine has CUDA")),  # fmt: skip
    ],
)
def test_cli_infer_errors_are_one_line(preset_dir, tmp_path, monkeypatch, capsys, args, message):
    args = [a.format(missing=tmp_path / "missing", prompt=preset_dir / "prompt.wav") for a in args]
    base = [] if "--ckpt-dir" in args else ["--ckpt-dir", str(preset_dir / "base")]
    code, _, err = _run_cli(
        monkeypatch, capsys, "infer", *base, "--text", "Hi.", "--output", str(tmp_path / "x.wav"), *args
    )
    assert code == 1
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.wav").exists()


def test_cli_infer_output_must_be_a_wav_path(preset_dir, tmp_path, monkeypatch, capsys):
    code, _, err = _run_cli(monkeypatch, capsys, "infer", "--ckpt-dir", str(preset_dir / "base"), "--text", "Hi.",
                            "--output", str(tmp_path / "x.mp3"))  # fmt: skip
    assert code == 2 and "ending in .wav" in err and not (tmp_path / "x.mp3").exists()
