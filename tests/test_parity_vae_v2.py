"""AudioVAE V2 parity with the official implementation (v2-tiny, float32): keys, encode at the encoder rate,
decode at the output rate under the sample-rate condition, per-row rates, windowed (streaming) decode."""

from __future__ import annotations

import pytest
import torch
from conftest import official_dir
from reference_data import assert_close, reference_tensors
from torch import nn

from voxcpm_core.config import AudioVAEConfigV2
from voxcpm_core.generation.sampling import decoder_history_frames
from voxcpm_core.io.checkpoint import load_state_dict_file, read_model_config
from voxcpm_core.models.audio_vae import AudioVAE, Decoder, Encoder
from voxcpm_core.models.audio_vae_v2 import AudioVAEV2

TINY = dict(encoder_dim=4, encoder_rates=[2, 3], latent_dim=8, decoder_dim=32, decoder_rates=[3, 2])


def _fixture():
    return official_dir("v2-tiny")


def _checkpoint() -> dict[str, torch.Tensor]:
    return load_state_dict_file(_fixture() / "base" / "audiovae.pth")


def _vae() -> AudioVAEV2:
    vae = AudioVAEV2(read_model_config(_fixture() / "base").audio_vae_config)
    vae.load_state_dict(_checkpoint(), strict=True)
    return vae.eval()


def _record_outputs(modules, name: str, store: dict) -> None:
    for key, module in modules.named_children():
        module.register_forward_hook(lambda _m, _in, out, key=f"{name}{key}": store.__setitem__(key, out))


def _layout(state_dict: dict[str, torch.Tensor]) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}


def test_keys_shapes_and_dtypes_match_checkpoint():
    weights = _checkpoint()
    ours = AudioVAEV2(read_model_config(_fixture() / "base").audio_vae_config).state_dict()
    assert _layout(ours) == _layout(weights)
    assert weights["decoder.sr_bin_boundaries"].dtype == torch.int32
    # one condition per decoder block (model.2 .. model.6), sized by the block's input channels
    widths = [weights[f"decoder.sr_cond_model.{i}.scale_embed.weight"].shape for i in range(2, 7)]
    assert widths == [(4, 64 // 2**k) for k in range(5)]


def test_encode_matches_reference():
    ref, vae, seen = reference_tensors(_fixture()), _vae(), {}
    _record_outputs(vae.encoder.block, "encoder_block", seen)
    wav = ref["vae.in.wav"]
    assert wav.shape[-1] % vae.hop_length != 0  # exercises the right padding
    with torch.no_grad():
        mu = vae.encode(wav)
    assert_close(mu, ref["vae.out.encode_mu"])
    assert len(seen) == len(vae.encoder.block)
    for key, out in seen.items():
        assert_close(out, ref[f"vae.out.{key}"])


def test_encoder_pads_odd_strides_by_the_stride():
    """V1's padding (2 * ceil(5 / 2) = 6 for the fixture's stride 5) gives other latents with the same weights."""
    ref, vae = reference_tensors(_fixture()), _vae()
    v1 = Encoder(vae.config)
    v1.load_state_dict(vae.encoder.state_dict())
    wav = ref["vae.in.wav"]
    with torch.no_grad():
        mu = v1(nn.functional.pad(wav, (0, -wav.shape[-1] % vae.hop_length)))
    assert (mu - ref["vae.out.encode_mu"]).abs().max() > 1e-3


def test_decode_at_output_rate_matches_reference():
    ref, vae, seen = reference_tensors(_fixture()), _vae(), {}
    _record_outputs(vae.decoder.model, "decoder_layer", seen)
    _record_outputs(vae.decoder.sr_cond_model, "sr_cond", seen)
    z = ref["vae.in.latent"]
    with torch.no_grad():
        wav = vae.decode(z)
    assert (vae.sample_rate, vae.out_sample_rate) == (16000, 48000)
    assert wav.shape == (z.shape[0], 1, z.shape[-1] * vae.decode_hop_length)
    assert_close(wav, ref["vae.out.decode"])
    expected = {
        k.removeprefix("vae.out.") for k in ref if k.startswith(("vae.out.decoder_layer", "vae.out.sr_cond"))
    }
    assert seen.keys() == expected
    for key, out in seen.items():
        assert_close(out, ref[f"vae.out.{key}"])


def test_decode_with_per_row_rates_matches_reference():
    ref, vae = reference_tensors(_fixture()), _vae()
    z, rates = ref["vae.in.sr_latent"], ref["vae.in.sr_cond"]  # 20000 sits on a boundary
    assert torch.equal(vae.decoder.bucket(rates, len(rates)), ref["vae.out.sr_bucket"])
    with torch.no_grad():
        per_row = vae.decode(z, rates)
        out_rate = vae.decode(z)
        assert torch.equal(vae.decode(z, vae.out_sample_rate), out_rate)
    assert_close(per_row, ref["vae.out.decode_sr"])
    # only the rows outside the output rate's bucket change
    changed = (per_row - out_rate).abs().amax(dim=(1, 2)) > 1e-3  # [4]
    assert changed.tolist() == (ref["vae.out.sr_bucket"] != vae.decoder.bucket(None, 1)).tolist()


def test_bucket_ties_go_down_and_use_the_loaded_boundaries():
    vae = _vae()
    rates = torch.tensor([20000, 24000, 44100, 48000])
    assert vae.decoder.bucket(rates, 4).tolist() == [0, 1, 3, 3]
    assert vae.decoder.bucket(30000, 2).tolist() == [1, 1]
    with pytest.raises(ValueError, match="sr_cond"):
        vae.decoder.bucket(rates, 2)
    weights = _checkpoint() | {
        "decoder.sr_bin_boundaries": torch.tensor([10000, 24000, 50000], dtype=torch.int32)
    }
    vae.load_state_dict(weights)
    assert vae.decoder.bucket(rates, 4).tolist() == [1, 1, 2, 2]


def test_runs_in_float32_and_the_boundaries_stay_int32():
    ref, vae = reference_tensors(_fixture()), _vae()
    vae.to(torch.float32)
    assert vae.decoder.sr_bin_boundaries.dtype == torch.int32
    with torch.no_grad():
        mu = vae.encode(ref["vae.in.wav"].to(torch.bfloat16))
        wav = vae.decode(ref["vae.in.latent"].to(torch.float64), torch.tensor([48000.0, 16000.0]))
    assert mu.dtype == wav.dtype == torch.float32


def test_windowed_decode_reproduces_the_stream_chunks_and_the_full_decode():
    """What our streaming does: each chunk of P frames decoded with decoder_history_frames of left context."""
    ref, vae = reference_tensors(_fixture()), _vae()
    z, P = ref["vae.in.stream_latent"], read_model_config(_fixture() / "base").patch_size
    history, chunk = decoder_history_frames(vae.config), P * vae.decode_hop_length
    with torch.no_grad():
        chunks = [
            vae.decode(z[..., max(0, s - history) : s + P])[..., -chunk:] for s in range(0, z.shape[-1], P)
        ]
        full = vae.decode(z)
    assert_close(torch.cat(chunks, dim=-1), ref["vae.out.stream_chunks"])
    assert_close(torch.cat(chunks, dim=-1), full)


def test_decoder_history_covers_the_v2_receptive_field():
    """The fixture's stream latent is shorter than the history; here the window really starts inside the latent."""
    vae = _vae()
    hop, history = vae.decode_hop_length, decoder_history_frames(vae.config)
    z = torch.randn(1, vae.latent_dim, history + 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(z)[..., -hop:]
        window = vae.decode(z[..., -history - 1 :])[..., -hop:]
        short = vae.decode(z[..., -(history // 2) - 1 :])[..., -hop:]
    assert_close(window, full)
    with pytest.raises(AssertionError):  # less context does change the samples
        assert_close(short, full)


def test_without_boundaries_the_decoder_is_v1s():
    cfg = AudioVAEConfigV2(**TINY, sr_bin_boundaries=None)
    vae, v1 = AudioVAEV2(cfg).eval(), Decoder(cfg).eval()
    assert not any("sr_" in key for key in vae.state_dict())
    v1.load_state_dict(vae.decoder.state_dict(), strict=True)
    z = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(z, 24000), v1(z))


@pytest.mark.parametrize(
    "cond_type, out_layer",
    [
        ("scale_bias", False),
        ("scale_bias", True),
        ("scale_bias_init", False),
        ("add", False),
        ("concat", True),
    ],
)
def test_condition_kinds(cond_type, out_layer):
    cfg = AudioVAEConfigV2(
        **TINY, sr_bin_boundaries=[20000], cond_type=cond_type, cond_dim=5, cond_out_layer=out_layer
    )
    vae, seen = AudioVAEV2(cfg).eval(), {}
    conds = vae.decoder.sr_cond_model
    assert list(conds) == ["2", "3"]  # the two decoder blocks
    for key, cond in conds.items():
        cond.register_forward_hook(lambda _m, args, out, key=key: seen.__setitem__(key, (args[0], out)))
    with torch.no_grad():
        for table in conds.modules():  # off "scale_bias_init"'s identity, so each term of the formula counts
            if isinstance(table, nn.Embedding):
                table.weight.normal_()
        vae.decode(torch.randn(2, 8, 3), torch.tensor([16000, 44100]))
    bucket = torch.tensor([0, 1])
    assert seen.keys() == {"2", "3"}
    for key, (x, out) in seen.items():
        cond = conds[key]
        assert out.shape == x.shape
        if cond_type == "add":
            expected = x + cond.embed.weight[bucket][..., None]
        elif cond_type == "concat":
            assert cond.embed.weight.shape == (2, 5)
            expected = torch.cat([x, cond.embed.weight[bucket][..., None].expand(-1, -1, x.shape[-1])], dim=1)
        else:
            expected = (
                x * cond.scale_embed.weight[bucket][..., None] + cond.bias_embed.weight[bucket][..., None]
            )
        if out_layer:  # a 1x1 conv from the conditioned width back to the block's channels
            assert tuple(cond.out_layer[1].weight_v.shape) == (x.shape[1], expected.shape[1], 1)
            expected = cond.out_layer(expected)
        assert torch.allclose(out, expected, atol=1e-6)


def test_scale_bias_init_starts_as_the_identity():
    vae = AudioVAEV2(AudioVAEConfigV2(**TINY, cond_type="scale_bias_init")).eval()
    plain = Decoder(vae.config).eval()
    plain.load_state_dict({k: v for k, v in vae.decoder.state_dict().items() if k.startswith("model.")})
    z = torch.randn(1, 8, 4)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, 16000), plain(z))


def test_v1_vae_output_rate_and_decode_hop_are_its_own(preset_dir):
    vae = AudioVAE(read_model_config(preset_dir / "base").audio_vae_config)
    assert vae.out_sample_rate == vae.sample_rate
    assert vae.decode_hop_length == vae.hop_length
