"""The CPU capability module sees what the CPU and the environment's ISA caps allow, and the caps really
change the kernels torch and oneDNN run (so CI on an AVX-512 machine can exercise the AVX2 paths); the CPU
kernels are swapped into models built plain, wherever they are built for work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voxcpm_core.cpu import capability
from voxcpm_core.cpu.capability import CAP_VARIABLES, cpu
from voxcpm_core.cpu.kernels import (
    PACKABLE_DTYPES,
    SMALL_ATTENTION_KEYS,
    OneDNNLinear,
    OneDNNProduct,
    linear,
    use_cpu_kernels,
)

# Prints what the code sees and which kernel oneDNN picked for one float32 linear (ONEDNN_VERBOSE=1).
PROBE = """
import json, torch
from voxcpm_core.cpu.capability import cpu
x, w = torch.randn(16, 64), torch.randn(32, 64)
torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
print(json.dumps(cpu().to_dict()))
"""


def _probe(**caps: str) -> tuple[dict, str]:
    """(capability seen, oneDNN's inner-product implementation) in a fresh process under ``caps``."""
    env = {k: v for k, v in os.environ.items() if k not in CAP_VARIABLES} | caps | {"ONEDNN_VERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    kernels = [line.split(",")[6] for line in lines if line.startswith("onednn_verbose") and ",inner_product," in line]
    assert kernels, proc.stdout[-2000:]
    return json.loads(lines[-1]), kernels[0]


def test_capability_agrees_with_torch_and_with_what_runs():
    cap = cpu()
    assert cap.isa == torch.backends.cpu.get_cpu_capability()
    assert cap.caps == {k: os.environ[k] for k in CAP_VARIABLES if os.environ.get(k)}
    assert set(cap.flags) <= set(capability.REPORTED_FLAGS)
    if cap.native_bf16:
        assert set(cap.flags) & capability.NATIVE_BF16_FLAGS
    # the bf16 oneDNN kernel is claimed exactly when one runs
    if cap.onednn:
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        try:
            torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 8, dtype=torch.bfloat16), None, "none", [None], "")
            runs = True
        except RuntimeError:
            runs = False
        assert cap.onednn_bf16 == (runs and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert (torch.bfloat16 in PACKABLE_DTYPES) == cap.onednn_bf16


@pytest.mark.skipif(not cpu().onednn or cpu().machine not in ("x86_64", "AMD64"), reason="x86 oneDNN caps")
def test_isa_caps_change_the_kernels_and_the_capability_seen():
    avx2, avx2_kernel = _probe(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert avx2["isa"] == "AVX2" and avx2["caps"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert avx2["native_bf16"] is False and avx2["onednn_bf16"] is False  # no bf16 kernel at AVX2
    assert "avx2" in avx2_kernel and "avx512" not in avx2_kernel

    low, low_kernel = _probe(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
    assert low["isa"] == "DEFAULT"
    assert "avx" not in low_kernel and low_kernel != avx2_kernel  # the cap moved oneDNN to another kernel

    uncapped, kernel = _probe()
    if "avx512f" in uncapped["flags"]:  # on an AVX-512 machine the AVX2 cap is a real step down
        assert uncapped["isa"].startswith("AVX512") and "avx512" in kernel


def test_bf16_linear_works_on_every_cpu_class():
    """Without a bf16 oneDNN kernel the linear takes the path that always works, with bf16 numerics."""
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 32), torch.randn(16, 32), torch.randn(16)
    out = linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
    expected = (x.bfloat16().float() @ w.bfloat16().float().T + b.bfloat16().float()).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("native", [True, False])
def test_generation_dtype_auto_is_bf16_only_with_native_bf16(native, monkeypatch):
    from conftest import official_dir

    from voxcpm_core.io.checkpoint import read_model_config, resolve_dtype

    config = read_model_config(official_dir("v15-tiny") / "base")
    monkeypatch.setattr(capability, "cpu", lambda: dataclasses.replace(cpu(), native_bf16=native))
    host = torch.device("cpu")
    assert resolve_dtype("auto", host, config) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype(None, host, config) == torch.float32  # training, merging and saving stay exact
    assert resolve_dtype("float32", host, config) == torch.float32


def test_explicit_bf16_on_a_cpu_without_native_bf16_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    from conftest import official_dir

    from voxcpm_cli.main import main

    monkeypatch.setattr(capability, "cpu", lambda: dataclasses.replace(cpu(), native_bf16=False))
    out = tmp_path / "a.wav"
    monkeypatch.setattr(sys, "argv", ["voxcpm", "infer", "--ckpt-dir", str(official_dir("v15-tiny") / "base"),
                                      "--text", "Hi.", "--output", str(out), "--dtype", "bfloat16", "--max-len", "3",
                                      "--seed", "1", "--device", "cpu"])
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code in (0, None) and out.is_file()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "emulated" in warnings[0] and "Traceback" not in err


# ---- the kernels swapped into built models -----------------------------------------------------------


def _swappable(model):
    """(linears, LoRA layers, attention layers) of a model."""
    from voxcpm_core.models.lora import LoRALinear
    from voxcpm_core.models.minicpm import Attention

    kinds = (torch.nn.Linear, LoRALinear, Attention)
    return tuple([m for m in model.modules() if isinstance(m, kind)] for kind in kinds)


def test_cpu_kernels_are_swapped_in_after_build_keeping_parameters_keys_and_math(preset_dir):
    from reference_data import assert_close, reference_batch, reference_draws, reference_tensors

    from voxcpm_core.io.checkpoint import load_model_dir
    from voxcpm_core.models.lora import LoRAConfig

    model = load_model_dir(preset_dir / "base", lora=LoRAConfig(enable_lm=True, enable_proj=True, r=2)).model
    linears, loras, attentions = _swappable(model)
    assert {type(m) for m in linears} == {torch.nn.Linear} and loras and attentions  # built plain
    assert all(a.small_attention_keys == 0 for a in attentions)
    ref = reference_tensors(preset_dir)
    batch, draws = reference_batch(ref), reference_draws(ref)
    with torch.no_grad():
        plain = model(batch, draws)
    params, keys = dict(model.named_parameters()), list(model.state_dict())

    swapped = use_cpu_kernels(model)
    assert swapped == (len(linears) + len(loras) if cpu().onednn else 0)
    if cpu().onednn:
        assert {type(m) for m in linears} == {OneDNNLinear}
        assert all(isinstance(m.linear_product, OneDNNProduct) for m in loras)
    assert all(a.small_attention_keys == SMALL_ATTENTION_KEYS for a in attentions)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == list(params)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors, not copies
    with torch.no_grad():
        fast = model(batch, draws)
    for key in ("loss/diff", "loss/stop"):
        assert_close(fast[key], plain[key])
    assert use_cpu_kernels(model) == 0  # idempotent

    with torch.device("meta"):  # a model that is not on the CPU is left as built
        elsewhere = torch.nn.Linear(4, 4)
    assert use_cpu_kernels(elsewhere) == 0 and type(elsewhere) is torch.nn.Linear


def _counted(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)

    return counted


@pytest.mark.skipif(not cpu().onednn, reason="torch built without oneDNN")
def test_training_steps_run_the_cpu_kernels(preset_dir, monkeypatch):
    """The trainer's step (and bench/train.py, which calls it) puts float32 linears on oneDNN, few keys on matmuls."""
    from reference_data import reference_batch, reference_tensors

    from voxcpm_core.cpu import kernels
    from voxcpm_core.io.checkpoint import load_model_dir
    from voxcpm_core.models import minicpm
    from voxcpm_core.models.lora import LoRAConfig
    from voxcpm_core.training.config import TrainConfig
    from voxcpm_core.training.distributed import Dist
    from voxcpm_core.training.optim import select_trainable
    from voxcpm_core.training.step import TrainStep

    model = load_model_dir(preset_dir / "base", lora=LoRAConfig(enable_lm=True, enable_dit=True, r=2)).model
    cfg = TrainConfig(hf_model_id="unused", train_manifest=Path("unused.jsonl"), save_path=Path("unused"), precision="fp32")
    step = TrainStep(model, select_trainable(model, lora=True), cfg, True, Dist())
    calls = []
    for module, name in ((kernels, "onednn_mm"), (minicpm, "small_attention")):
        monkeypatch.setattr(module, name, _counted(getattr(module, name), calls))
    step([reference_batch(reference_tensors(preset_dir))], 0)
    assert set(calls) == {"onednn_mm", "small_attention"}


def test_generation_loading_swaps_the_cpu_kernels_in_also_for_lora_layers_added_later(preset_dir):
    from voxcpm_core.api import VoxCPM

    tts = VoxCPM.from_pretrained(preset_dir / "base", device="cpu", dtype="float32", optimize=False)
    linears, loras, attentions = _swappable(tts.model)
    assert not loras and all(a.small_attention_keys == SMALL_ATTENTION_KEYS for a in attentions)
    assert all(type(m) is (OneDNNLinear if cpu().onednn else torch.nn.Linear) for m in linears)
    tts.load_lora(preset_dir / "lora")  # hot-swap onto a model loaded without LoRA: new LoRA layers
    _, loras, _ = _swappable(tts.model)
    assert loras and all(isinstance(m.linear_product, OneDNNProduct) == cpu().onednn for m in loras)
