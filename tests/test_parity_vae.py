"""Audio VAE parity with the official implementation (both presets, float32): keys, encode, decode, intermediates."""

from __future__ import annotations

import torch
from reference_data import assert_close, reference_tensors

from voxcpm_core.config import AudioVAEConfig
from voxcpm_core.io.checkpoint import load_audio_vae, load_state_dict_file, read_model_config
from voxcpm_core.models.audio_vae import AudioVAE


def _vae(preset_dir) -> AudioVAE:
    return load_audio_vae(preset_dir / "base", read_model_config(preset_dir / "base"))


def _record_outputs(modules: torch.nn.Sequential, name: str, store: dict) -> None:
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda _m, _in, out, key=f"{name}{i}": store.__setitem__(key, out))


def test_vae_keys_and_shapes_match_checkpoint(preset_dir):
    weights = load_state_dict_file(preset_dir / "base" / "audiovae.pth")
    ours = AudioVAE(read_model_config(preset_dir / "base").audio_vae_config).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in weights.items()}


def test_vae_encode_matches_reference(preset_dir):
    ref, vae, seen = reference_tensors(preset_dir), _vae(preset_dir), {}
    _record_outputs(vae.encoder.block, "encoder_block", seen)
    wav = ref["vae.in.wav"]
    assert wav.shape[-1] % vae.hop_length != 0  # exercises the right padding
    with torch.no_grad():
        mu = vae.encode(wav)
    assert_close(mu, ref["vae.out.encode_mu"])
    assert len(seen) == len(vae.encoder.block)
    for key, out in seen.items():
        assert_close(out, ref[f"vae.out.{key}"])


def test_vae_decode_matches_reference(preset_dir):
    ref, vae, seen = reference_tensors(preset_dir), _vae(preset_dir), {}
    _record_outputs(vae.decoder.model, "decoder_layer", seen)
    z = ref["vae.in.latent"]
    with torch.no_grad():
        wav = vae.decode(z)
    assert wav.shape == (z.shape[0], 1, z.shape[-1] * vae.hop_length)
    assert_close(wav, ref["vae.out.decode"])
    assert len(seen) == len(vae.decoder.model)
    for key, out in seen.items():
        assert_close(out, ref[f"vae.out.{key}"])


def test_vae_runs_in_float32_for_other_input_dtypes(preset_dir):
    ref, vae = reference_tensors(preset_dir), _vae(preset_dir)
    with torch.no_grad():
        mu = vae.encode(ref["vae.in.wav"].to(torch.bfloat16))
        wav = vae.decode(ref["vae.in.latent"].to(torch.float64))
    assert mu.dtype == wav.dtype == torch.float32


def test_noise_block_adds_a_weight_normed_projection():
    vae = AudioVAE(AudioVAEConfig(encoder_dim=4, latent_dim=8, decoder_dim=16, use_noise_block=True))
    keys = vae.state_dict()
    assert (
        "decoder.model.2.block.2.linear.weight_v" in keys
        and "decoder.model.2.block.2.linear.bias" not in keys
    )
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 8, 3))
    assert out.shape == (1, 1, 3 * vae.hop_length)
