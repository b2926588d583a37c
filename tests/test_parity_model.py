"""Numerical parity of the non-VAE network with the official implementation's outputs (both tiny presets, float32),
as built and with the CPU kernels swapped in."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from reference_data import assert_close, reference_batch, reference_draws
from safetensors.torch import load_file

from voxcpm_core.cpu.kernels import use_cpu_kernels
from voxcpm_core.data.collate import collate
from voxcpm_core.io.checkpoint import read_model_config
from voxcpm_core.models.batch import TrainBatch
from voxcpm_core.models.flow_matching import FlowDraws
from voxcpm_core.models.kv_cache import KVCache
from voxcpm_core.models.voxcpm import VoxCPMModel


@functools.cache
def _fixture(preset_dir: Path):
    ref = load_file(preset_dir / "reference.safetensors")
    info = json.loads((preset_dir / "reference.json").read_text())
    return (
        read_model_config(preset_dir / "base"),
        load_file(preset_dir / "base" / "model.safetensors"),
        ref,
        info,
    )


@pytest.fixture(params=["built", "cpu_kernels"])
def fx(preset_dir, request):
    config, weights, ref, info = _fixture(preset_dir)
    model = VoxCPMModel(config)
    model.load_state_dict(weights, strict=True)
    if request.param == "cpu_kernels":
        use_cpu_kernels(model)
    return model.eval(), ref, info


# ---- weights ----------------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_match_checkpoint(preset_dir):
    config, weights, _, _ = _fixture(preset_dir)
    ours = VoxCPMModel(config).state_dict()
    assert sorted(ours) == sorted(weights)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in weights.items()}


# ---- backbone ---------------------------------------------------------------------------------


def test_rope_tables(fx):
    model, ref, _ = fx
    # tighter than RTOL: tables built in float64 land ~2e-6 away from the reference's float32 ones
    assert_close(model.base_lm.rope_emb.cos[:64], ref["rope.cos_first64"], rtol=1e-6)
    assert_close(model.base_lm.rope_emb.sin[:64], ref["rope.sin_first64"], rtol=1e-6)


def test_base_lm_layers_and_rotated_keys(fx):
    model, ref, _ = fx
    x = ref["base_lm.in.inputs_embeds"]
    layer_outputs = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: layer_outputs.append(o)) for layer in model.base_lm.layers
    ]
    cache = KVCache.for_stack(model.base_lm.config, batch=x.shape[0], max_len=x.shape[1] + 3)
    with torch.no_grad():
        out = model.base_lm(x, cache)
    for hook in hooks:
        hook.remove()
    assert_close(out, ref["base_lm.out.hidden"])
    assert len(layer_outputs) == model.config.lm_config.num_hidden_layers
    for i, h in enumerate(layer_outputs):
        assert_close(h, ref[f"base_lm.out.layer{i}"])
        assert_close(cache.layers[i].k[:, :, : x.shape[1]], ref[f"base_lm.out.k{i}"])
        assert_close(cache.layers[i].v[:, :, : x.shape[1]], ref[f"base_lm.out.v{i}"])


def test_base_lm_incremental_decoding(fx):
    model, ref, _ = fx
    xs = ref["base_lm.step.in.inputs_embeds"]  # [1, 9, H]
    cache = KVCache.for_stack(model.base_lm.config, batch=1, max_len=16)
    with torch.no_grad():
        assert_close(model.base_lm(xs), ref["base_lm.step.out.full"])
        model.base_lm(xs[:, :6], cache)
        steps = torch.cat([model.base_lm(xs[:, j : j + 1], cache, start_pos=j) for j in range(6, 9)], dim=1)
        assert_close(steps, ref["base_lm.step.out.steps"])
        assert_close(steps, ref["base_lm.step.out.full"][:, 6:])
        cache.reset()
        model.base_lm(xs[:, :6], cache)
        # several new positions at once: a non-square causal mask
        chunk = model.base_lm(xs[:, 6:], cache, start_pos=6)
    assert_close(chunk, ref["base_lm.step.out.full"][:, 6:])


def test_residual_lm(fx):
    model, ref, _ = fx
    with torch.no_grad():
        assert_close(model.residual_lm(ref["residual_lm.in.inputs_embeds"]), ref["residual_lm.out.hidden"])


# ---- local modules and heads ------------------------------------------------------------------


def test_local_encoder_and_projection(fx):
    model, ref, _ = fx
    feats = ref["feat_encoder.in.feats"]
    with torch.no_grad():
        assert_close(model.feat_encoder(feats), ref["feat_encoder.out"])
        assert_close(model.encode_patches(feats), ref["enc_to_lm_proj.out"])


def test_local_dit(fx):
    model, ref, _ = fx
    inputs = [ref[f"dit.in.{name}"] for name in ("x", "mu", "t", "cond", "dt")]
    with torch.no_grad():
        assert_close(model.feat_decoder.estimator(*inputs), ref["dit.out"])


def test_fsq_and_stop_head(fx):
    model, ref, _ = fx
    with torch.no_grad():
        assert_close(model.fsq_layer.quantize(ref["fsq.in"]), ref["fsq.latent_eval"])
        assert_close(model.fsq_layer(ref["fsq.in"]), ref["fsq.out_eval"])
        assert_close(model.stop_logits(ref["stop.in"]), ref["stop.logits"])


def test_cfm_sampler(fx):
    model, ref, _ = fx
    out = model.feat_decoder.sample(
        ref["cfm.in.mu"], ref["cfm.in.cond"], n_timesteps=4, cfg_value=2.0, noise=ref["cfm.in.z"]
    )
    assert_close(out, ref["cfm.out"])


# ---- batch layout -----------------------------------------------------------------------------


def test_collate_reproduces_reference_packer_layout(fx):
    _, ref, _ = fx
    packed = reference_batch(ref)
    samples = []
    for b in range(packed.text_tokens.shape[0]):
        ids = packed.text_tokens[b]
        n = int((ids == 101).nonzero()[0])  # text ids are the text-mask positions before 101
        assert packed.text_mask[b, :n].all()
        samples.append((ids[:n].tolist(), packed.audio_feats[b][packed.audio_mask[b].bool()], 7 + b))
    batch = collate(samples)
    for name in ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels", "audio_feats"):
        assert torch.equal(getattr(batch, name).float(), getattr(packed, name).float()), name
    assert batch.text_tokens.dtype == batch.labels.dtype == torch.long
    assert batch.dataset_ids.tolist() == [7, 8]
    moved = batch.to("meta")
    assert all(getattr(moved, name).device.type == "meta" for name in vars(batch))


# ---- training ---------------------------------------------------------------------------------


def test_flow_draws_follow_reference_rng_order(fx):
    model, ref, info = fx
    cfm = model.feat_decoder.config
    N, D, P = ref["train.rng.z"].shape
    seed = info["sub_seeds"]["train_forward"]

    torch.manual_seed(seed)
    draws = FlowDraws.draw(N, D, P, cfm)
    after_ours = torch.rand(4)

    torch.manual_seed(seed)  # replay the documented order with plain torch calls
    raw = {"cfg_rand": torch.rand(N), "noisy_rand": torch.rand(N)}
    torch.randn(N, D, P)
    raw |= {"s_r": torch.randn(N), "s_t": torch.randn(N), "rt_rand": torch.rand(N)}
    z = torch.randn(N, D, P)
    after_reference = torch.rand(4)

    for name, value in raw.items():
        assert torch.equal(value, ref[f"train.rng.raw_{name}"]), name
    assert torch.equal(z, ref["train.rng.z"])
    assert torch.equal(draws.cfg_keep, ref["train.rng.cfg_mask"].bool())
    assert torch.equal(draws.z, ref["train.rng.z"])
    assert_close(draws.t, ref["train.rng.t"], rtol=1e-7)
    assert torch.equal(after_ours, after_reference)  # no draw missing, none extra


def test_training_forward_losses_intermediates_and_gradients(fx):
    model, ref, _ = fx
    model.train()
    seen = {}

    def keep(name):
        return lambda m, args, out: seen.__setitem__(name, (args, out))

    model.base_lm.register_forward_hook(keep("base_lm"))
    model.residual_lm.register_forward_hook(keep("residual_lm"))
    model.feat_decoder.estimator.register_forward_hook(keep("estimator"))
    model.stop_proj.register_forward_hook(keep("stop_proj"))
    model.stop_head.register_forward_hook(keep("stop_head"))

    out = model(reference_batch(ref), reference_draws(ref))
    assert_close(out["loss/diff"], ref["train.base.loss_diff"])
    assert_close(out["loss/stop"], ref["train.base.loss_stop"])

    assert_close(seen["base_lm"][1], ref["train.base.base_lm_out"])
    assert_close(seen["residual_lm"][1], ref["train.base.residual_lm_out"])
    assert_close(seen["stop_proj"][0][0], ref["train.base.lm_hidden"])
    assert_close(seen["stop_head"][1], ref["train.base.stop_logits"])
    (y, mu, t, cond, dt), pred = seen["estimator"]
    rows = reference_batch(ref).loss_mask.flatten().nonzero().squeeze(1)  # the LocDiT sees the loss rows only
    assert 0 < len(rows) < len(ref["train.rng.t"])
    assert_close(y, ref["train.base.estimator_y"][rows])
    assert_close(mu, (ref["train.compute_loss.dit_hidden"] * ref["train.rng.cfg_mask"][:, None])[rows])
    assert_close(cond, ref["train.compute_loss.cond"][rows])
    assert torch.equal(t, ref["train.rng.t"][rows]) and not dt.any()
    assert_close(pred, ref["train.base.u_pred"][rows])

    (out["loss/diff"] + out["loss/stop"]).backward()
    params = dict(model.named_parameters())
    grads = {
        k.removeprefix("train.base.grad."): v for k, v in ref.items() if k.startswith("train.base.grad.")
    }
    assert grads
    for name, expected in grads.items():
        assert_close(params[name].grad, expected)


def test_training_forward_draws_from_seed_like_reference(fx):
    model, ref, info = fx
    model.train()
    torch.manual_seed(info["sub_seeds"]["train_forward"])
    with torch.no_grad():
        out = model(reference_batch(ref))
    assert_close(out["loss/diff"], ref["train.base.loss_diff"])
    assert_close(out["loss/stop"], ref["train.base.loss_stop"])


def test_per_sample_losses_equal_single_sample_batches(fx):
    model, ref, _ = fx
    batch, draws = reference_batch(ref), reference_draws(ref)
    B, T = batch.text_tokens.shape
    with torch.no_grad():
        out = model(batch, draws)
        for b in range(B):
            L = int(batch.text_mask[b].nonzero().max()) + 1  # drop the padding
            rows = slice(b * T, b * T + L)
            one = TrainBatch(
                **{k: v[b : b + 1, :L] if v.dim() > 1 else v[b : b + 1] for k, v in vars(batch).items()}
            )
            alone = model(one, FlowDraws(draws.cfg_keep[rows], draws.t[rows], draws.z[rows]))
            assert_close(out["loss/diff_per_sample"][b], alone["loss/diff"])
            assert_close(out["loss/stop_per_sample"][b], alone["loss/stop"])
    weights = batch.loss_mask.sum(1)
    assert_close((out["loss/stop_per_sample"] * weights).sum() / weights.sum(), out["loss/stop"])


# ---- what generation needs --------------------------------------------------------------------


def test_prefill_then_decode_steps_match_full_sequence(fx):
    model, ref, _ = fx
    batch = reference_batch(ref)
    audio = batch.audio_mask[0].nonzero().flatten()  # audio positions of sample 0
    end = int(audio[-1]) + 1
    split = int(audio[1]) + 1  # prefill text + two audio patches, then decode the rest
    seq = (
        batch.text_tokens[:1, :end],
        batch.audio_feats[:1, :end],
        batch.text_mask[:1, :end],
        batch.audio_mask[:1, :end],
    )
    caches = [KVCache.for_stack(lm.config, batch=1, max_len=end) for lm in (model.base_lm, model.residual_lm)]
    with torch.no_grad():
        lm_full, res_full = model.encode_sequence(*seq)
        model.encode_sequence(*(x[:, :split] for x in seq), *caches)
        for pos in range(split, end):
            e = model.encode_patches(batch.audio_feats[:1, pos : pos + 1])
            lm_h, res_h = model.decode_step(e, *caches, start_pos=pos)
            assert_close(lm_h, lm_full[:, pos : pos + 1])
            assert_close(res_h, res_full[:, pos : pos + 1])
