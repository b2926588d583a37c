"""What the speed work must keep true: masked-out rows cost nothing and change nothing, the fast paths
(oneDNN linears, lean RMSNorm, gradient checkpointing, bf16) compute the same training step."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from reference_data import assert_close, reference_batch, reference_draws, reference_tensors
from typer.testing import CliRunner
from wavs import write_clip, write_manifest

from voxcpm_cli.main import app
from voxcpm_core.cpu import capability
from voxcpm_core.cpu.kernels import ONEDNN, OneDNNLinear, PackedWeight, linear, pack_weights, use_cpu_kernels
from voxcpm_core.dev.builder import build_model_dir, tiny_config
from voxcpm_core.io.checkpoint import load_lora_dir, load_model_dir
from voxcpm_core.models.kv_cache import KVCache
from voxcpm_core.models.lora import LoRAConfig, LoRALinear, trainable_lora_parameters
from voxcpm_core.models.minicpm import RMSNorm, causal_mask, small_attention
from voxcpm_core.training import precision as precision_module
from voxcpm_core.training.precision import in_float32, resolve_precision, store_frozen_linears_in_bf16

LORA = LoRAConfig(enable_lm=True, enable_dit=True, enable_proj=True, r=4, alpha=8)


def _losses_and_grads(model, batch, draws, autocast=None):
    model.zero_grad(set_to_none=True)
    with autocast or torch.autocast("cpu", enabled=False):
        out = model(batch, draws)
    (out["loss/diff"] + out["loss/stop"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors (weights included) autograd keeps for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


# ---- row selection ----------------------------------------------------------------------------


def test_encoder_and_dit_see_only_the_rows_that_need_them(preset_dir):
    model = load_model_dir(preset_dir / "base").model.train()
    ref = reference_tensors(preset_dir)
    batch, draws = reference_batch(ref), reference_draws(ref)
    seen = {}
    model.feat_encoder.register_forward_hook(lambda m, args, out: seen.__setitem__("encoder", args[0].shape))
    model.feat_decoder.estimator.register_forward_hook(lambda m, args, out: seen.__setitem__("dit", args[0].shape))
    out = model(batch, draws)
    assert seen["encoder"][:2] == (int(batch.audio_mask.sum()), 1)  # [audio rows, 1, P, D]
    assert seen["dit"][0] == int(batch.loss_mask.count_nonzero()) < batch.loss_mask.numel()

    # padding rows cost nothing and change nothing: garbage there leaves every loss and gradient as it was
    padding = (batch.text_mask + batch.audio_mask) == 0
    assert padding.any()
    feats = batch.audio_feats.clone()
    feats[padding] = 1e3 * torch.randn_like(feats[padding])
    noisy = dataclasses.replace(batch, audio_feats=feats, text_tokens=batch.text_tokens.masked_fill(padding, 7))
    with torch.no_grad():
        again = model(noisy, draws)
    for key in out:
        assert torch.equal(out[key], again[key]), key


# ---- fast paths compute the same math --------------------------------------------------------


def test_stack_outputs_compute_only_the_positions_read(preset_dir):
    model = load_model_dir(preset_dir / "base").model
    dit = model.feat_decoder.estimator.decoder
    x = torch.randn(3, 9, dit.config.hidden_size, requires_grad=True)
    full = dit(x)
    last = dit(x, outputs=slice(5, None))
    assert_close(last, full[:, 5:], rtol=1e-6)
    g = torch.randn_like(last)
    assert_close(torch.autograd.grad(last, x, g)[0], torch.autograd.grad(full[:, 5:], x, g)[0], rtol=1e-6)
    seen = []
    dit.layers[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    dit(x, outputs=slice(0, 1))
    assert seen == [1]  # the last layer's MLP ran on the one position read
    with pytest.raises(ValueError, match="bidirectional"):
        model.base_lm(x[..., : model.base_lm.config.hidden_size], outputs=slice(0, 1))


def test_onednn_linear_saves_a_row_slice_contiguous_for_the_weight_gradient():
    """The last layer of the local encoder reads one position per patch: a strided view whose transpose
    sends oneDNN's weight-gradient matmul to its reference kernel."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 5, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    x = hidden[:, :1]  # [6, 1, 32], row stride 5 * 32
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        y = linear(x, w)
    assert saved and all(s.is_contiguous() for s in saved)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, (hidden, w), g)
    expected = torch.autograd.grad(F.linear(x, w), (hidden, w), g)
    for a, e in zip(ours, expected, strict=True):
        assert_close(a, e, rtol=1e-6)


@pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
def test_onednn_linear_matches_f_linear_and_keeps_no_input_for_frozen_weights():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    w, b = torch.randn(40, 24, requires_grad=True), torch.randn(40, requires_grad=True)
    g = torch.randn(3, 5, 40)
    ours = torch.autograd.grad(linear(x, w, b), (x, w, b), g)
    expected = torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)
    assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-6)
    for a, e in zip(ours, expected, strict=True):
        assert_close(a, e, rtol=1e-6)

    frozen = w.detach()
    assert _saved_bytes(lambda: linear(x, frozen)) == frozen.numel() * 4  # the weight only, not the input
    assert _saved_bytes(lambda: linear(x, w)) == (w.numel() + x.numel()) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w, b).dtype == torch.bfloat16  # autocast regions take torch's own path
    assert linear(x[:0], w, b).shape == (0, 5, 40)


@pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype, rows", [(torch.float32, 7), (torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 18)])
def test_packed_weights_compute_the_same_and_follow_weight_changes(dtype, rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(dtype)
    x = torch.randn(2, rows, 64).to(dtype)
    plain = F.linear(x, layer.weight, layer.bias)
    assert pack_weights(layer) == 0  # only the products use_cpu_kernels put on oneDNN
    assert use_cpu_kernels(layer) == 1 and pack_weights(layer) == 1
    assert isinstance(layer.linear_product.packed, PackedWeight)
    with torch.no_grad():
        assert_close(layer(x).float(), plain.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
        layer.weight.mul_(-1)  # an in-place change (LoRA merge, load_state_dict) repacks on the next call
        assert_close(layer(x).float(), F.linear(x, layer.weight, layer.bias).float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    out = layer(x)  # with grad: the plain weight, which autograd can differentiate
    out.float().sum().backward()
    assert layer.weight.grad is not None
    assert pack_weights(layer, enabled=False) == 1 and layer.linear_product.packed is None


@pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
def test_packed_model_generates_what_the_plain_model_does(preset_dir, monkeypatch):
    from voxcpm_core.api import VoxCPM

    def packed(model) -> set[str]:
        return {name for name, m in model.named_modules() if isinstance(m, OneDNNLinear) and m.linear_product.packed is not None}

    plain = VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="float32", optimize=False)
    fast = VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="float32")  # the API default packs on CPU
    assert not packed(plain.model)
    multi_row = {name for name, m in fast.model.named_modules() if isinstance(m, OneDNNLinear)
                 and name.startswith(("feat_encoder.", "feat_decoder."))}  # fmt: skip
    assert packed(fast.model) == multi_row and multi_row  # float32: the LM steps (one row) read the plain weights
    fast_bf16 = VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="bfloat16", optimize=True)
    assert packed(fast_bf16.model) == {name for name, m in fast_bf16.model.named_modules() if isinstance(m, torch.nn.Linear)}
    a = plain.generate("packed weights", seed=3, max_len=6, retry_badcase=False)
    reads = []
    get = PackedWeight.get
    monkeypatch.setattr(PackedWeight, "get", lambda self, weight: reads.append(weight) or get(self, weight))
    b = fast.generate("packed weights", seed=3, max_len=6, retry_badcase=False)
    assert a.shape == b.shape and float(abs(a - b).max()) < 1e-3
    assert reads  # generation read packed weights (the LocDiT's rows, at least)


def test_decode_steps_build_no_autograd_graph(preset_dir):
    """Generation runs in inference mode wherever it is called from (packed weights are read only there)."""
    from voxcpm_core.generation import sampling as inference

    loaded = load_model_dir(preset_dir / "base")
    cfg = loaded.model.config
    inputs = inference.prepare_inputs(loaded.tokenizer, "no graph", None, cfg.patch_size, cfg.feat_dim)
    opts = inference.SamplingOptions(inference_timesteps=3, max_len=2, retry_badcase=False)
    assert torch.is_grad_enabled()
    step = next(inference.decode_steps(loaded.model, inputs, opts, 2, torch.Generator().manual_seed(0)))
    assert torch.is_inference(step.patch) and not step.patch.requires_grad


@pytest.mark.parametrize("T, S, causal", [(5, 5, False), (9, 9, True), (3, 11, True), (1, 7, False)])
def test_small_attention_matches_sdpa(T, S, causal):
    torch.manual_seed(0)
    q = torch.randn(3, 8, T, 16, requires_grad=True)
    k, v = torch.randn(3, 2, S, 16, requires_grad=True), torch.randn(3, 2, S, 16, requires_grad=True)
    mask = causal_mask(T, S, q.device) if causal else None
    ours = small_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(ours, expected, rtol=1e-6)
    g = torch.randn_like(ours)
    for a, e in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g), strict=True):
        assert_close(a, e, rtol=1e-6)


def test_rms_norm_backward_matches_autograd_and_keeps_less():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 7, 32, requires_grad=True)
    g = torch.randn(4, 7, 32)

    def plain(x):  # the textbook formula, differentiated by autograd
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)) * norm.weight

    ours = torch.autograd.grad(norm(x), (x, norm.weight), g)
    expected = torch.autograd.grad(plain(x), (x, norm.weight), g)
    assert torch.equal(norm(x), plain(x))
    for a, e in zip(ours, expected, strict=True):
        assert_close(a, e, rtol=1e-6)
    assert _saved_bytes(lambda: norm(x)) < _saved_bytes(lambda: plain(x))


def test_gradient_checkpointing_gives_the_same_step_with_fewer_saved_activations(preset_dir):
    model = load_model_dir(preset_dir / "base").model.train()
    ref = reference_tensors(preset_dir)
    batch, draws = reference_batch(ref), reference_draws(ref)
    out, grads = _losses_and_grads(model, batch, draws)
    plain_bytes = _saved_bytes(lambda: model(batch, draws))
    model.set_gradient_checkpointing(True)
    out_ckpt, grads_ckpt = _losses_and_grads(model, batch, draws)
    assert _saved_bytes(lambda: model(batch, draws)) < plain_bytes / 2
    assert torch.equal(out["loss/diff"], out_ckpt["loss/diff"]) and torch.equal(out["loss/stop"], out_ckpt["loss/stop"])
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], rtol=1e-6)
    with torch.no_grad():  # no recomputation outside training
        assert _saved_bytes(lambda: model(batch, draws)) == 0


# ---- bf16 ---------------------------------------------------------------------------------------


def test_precision_resolution_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    native = dataclasses.replace(capability.cpu(), native_bf16=True)
    emulated = dataclasses.replace(capability.cpu(), native_bf16=False)
    assert resolve_precision("fp32", cpu).bf16 is False
    monkeypatch.setattr(capability, "cpu", lambda: native)
    assert resolve_precision("auto", cpu) == precision_module.Precision(bf16=True)  # the faster one, no notice
    assert resolve_precision("bf16", cpu) == precision_module.Precision(bf16=True)
    monkeypatch.setattr(capability, "cpu", lambda: emulated)
    assert resolve_precision("auto", cpu) == precision_module.Precision(bf16=False)
    explicit = resolve_precision("bf16", cpu)  # still bf16, with one line saying it is emulated
    assert explicit.bf16 is True and "emulated" in explicit.notice and "\n" not in explicit.notice


def test_lora_bf16_step_stores_frozen_linears_in_bf16_and_stays_close_to_fp32(preset_dir):
    base = load_model_dir(preset_dir / "base", lora=LORA).model.train()
    ref = reference_tensors(preset_dir)
    batch, draws = reference_batch(ref), reference_draws(ref)
    trainable = trainable_lora_parameters(base)
    with torch.no_grad():
        for name, p in trainable.items():  # non-zero adapters, so their gradients flow everywhere
            p.normal_(0, 0.05) if name.endswith("lora_B") else None
    out32, grads32 = _losses_and_grads(base, batch, draws)

    cast = store_frozen_linears_in_bf16(base)
    linears = [m for m in base.modules() if isinstance(m, (torch.nn.Linear, LoRALinear))]
    assert {id(p) for p in cast} == {id(m.weight) for m in linears} | {id(m.bias) for m in linears if m.bias is not None}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert base.base_lm.norm.weight.dtype == base.base_lm.embed_tokens.weight.dtype == torch.float32
    out16, grads16 = _losses_and_grads(base, batch, draws, torch.autocast("cpu", dtype=torch.bfloat16))
    for key in ("loss/diff", "loss/stop"):
        assert abs(out16[key].item() / out32[key].item() - 1) < 0.02, key
    assert grads16.keys() == set(trainable) and all(g.dtype == torch.float32 for g in grads16.values())

    before = {id(p): p.detach().clone() for p in cast}
    with in_float32(cast):
        assert all(p.dtype == torch.float32 for p in cast)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, before[id(p)]) for p in cast)


def test_train_lora_bf16_with_gradient_checkpointing_end_to_end(tmp_path):
    build_model_dir(tmp_path / "model", tiny_config(16000), seed=0)
    for i in range(4):
        write_clip(tmp_path / f"wavs/{i}.wav", seconds=0.5 + 0.1 * i, frequency=150 + 30 * i)
    write_manifest(tmp_path / "train.jsonl", [{"audio": f"wavs/{i}.wav", "text": f"clip {i}."} for i in range(4)])
    write_manifest(tmp_path / "val.jsonl", [{"audio": "wavs/0.wav", "text": "clip zero."}])
    cfg = dict(
        pretrained_path=str(tmp_path / "model"), train_manifest=str(tmp_path / "train.jsonl"),
        val_manifest=str(tmp_path / "val.jsonl"), cache_dir=str(tmp_path / "latents"), batch_size=2,
        num_workers=0, num_iters=2, log_interval=1, valid_interval=2, save_interval=0, learning_rate=0.002,
        warmup_steps=1, save_path=str(tmp_path / "run"), precision="bf16", gradient_checkpointing=True,
        lora=LORA.model_dump(),
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", "lora", "--config", str(tmp_path / "c.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    state_dict, _ = load_lora_dir(tmp_path / "run" / "step_0000002")
    assert state_dict and all(t.dtype == torch.float32 for t in state_dict.values())
    assert list((tmp_path / "run" / "samples" / "step_0000002").glob("*.wav"))  # generation after bf16 steps


def test_generation_allocates_its_kv_caches_once(preset_dir, monkeypatch):
    from voxcpm_core.generation import sampling as inference

    loaded = load_model_dir(preset_dir / "base")
    cfg = loaded.model.config
    inputs = inference.prepare_inputs(loaded.tokenizer, "one cache per stack", None, cfg.patch_size, cfg.feat_dim)
    opts = inference.SamplingOptions(inference_timesteps=3, min_len=5, max_len=5, retry_badcase=False)
    made = []
    for_stack = KVCache.for_stack.__func__
    monkeypatch.setattr(KVCache, "for_stack", classmethod(lambda cls, *a, **k: made.append(a[2]) or for_stack(cls, *a, **k)))
    steps = list(inference.decode_steps(loaded.model, inputs, opts, 5, torch.Generator().manual_seed(0)))
    assert len(steps) == 5
    S = inputs.text_tokens.shape[1]
    assert made == [S + 5, S + 5]  # base and residual LM, sized for the whole generation up front


def test_vae_decoding_in_generation_reuses_freed_memory_on_cpu(preset_dir, monkeypatch):
    from voxcpm_core.generation import sampling as inference

    loaded = load_model_dir(preset_dir / "base")
    cfg = loaded.model.config
    patches = torch.randn(3, cfg.patch_size, cfg.feat_dim)
    before = inference.decode_patches(loaded.vae, patches)
    blocks = []
    real = inference.reusing_freed_memory
    monkeypatch.setattr(inference, "reusing_freed_memory", lambda enabled: blocks.append(enabled) or real(enabled))
    assert torch.equal(inference.decode_patches(loaded.vae, patches), before)
    assert blocks == [True]


REUSE_THEN_RETURN = """
import os, torch
from pathlib import Path
from voxcpm_core.cpu.memory import reusing_freed_memory

def rss_mib():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def churn():  # 256 MiB allocated, touched and freed
    torch.empty(64 * 2**20).fill_(1.0)

base = rss_mib()
with reusing_freed_memory(enabled=False):
    churn()
    disabled = rss_mib()
with reusing_freed_memory():
    with reusing_freed_memory():  # nested: ending the inner block hands nothing back
        churn()
    inside = rss_mib()
after = rss_mib()
churn()
print(disabled - base, inside - base, after - base, rss_mib() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_reusing_freed_memory_keeps_it_inside_and_hands_it_back_after():
    """In its own process: the switch is process-wide, and the RSS figures must be this block's alone."""
    out = subprocess.run([sys.executable, "-c", REUSE_THEN_RETURN], capture_output=True, text=True, check=True)
    disabled, inside, after, later = map(float, out.stdout.split())
    assert disabled < 50  # glibc's own policy: a 256 MiB block is unmapped when freed
    assert inside > 200  # freed but kept for reuse until the outermost block ends
    assert after < 50 and later < 50  # handed back on exit; large blocks are unmapped again afterwards
