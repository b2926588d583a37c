"""Training precision: which dtype the matmuls run in, and how the model is set up for it.

    fp32   everything in float32.
    bf16   matmuls in bfloat16 under autocast, on CUDA and on CPUs with native bf16 instructions
           (x86 avx512_bf16 / amx_bf16, Arm bf16); elsewhere float32 with a notice.
           LoRA: the frozen linear weights are stored in bfloat16 (half the memory, no per-step
           weight casts); adapters, embeddings, norms and the residual stream stay float32.
           Full fine-tuning keeps float32 master weights (autocast casts them per step).
    auto   bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from voxcpm_core.lora import LoRALinear

CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags / Arm features with native bf16 math


def cpu_bf16_flags() -> set[str]:
    """The native-bf16 flags of this CPU, from /proc/cpuinfo (empty when unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split()) & CPU_BF16_FLAGS
    return flags


@dataclass(frozen=True)
class Precision:
    bf16: bool  # matmuls in bfloat16 (autocast)
    notice: str | None = None  # why a bf16 request fell back to float32

    def autocast(self, device: torch.device):
        """The autocast region of a forward (and of generation with a bf16 model); a no-op in fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision a run uses for the YAML's ``precision`` on ``device``."""
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return Precision(bf16=False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(bf16=True)
        return Precision(False, f"precision: {requested}: this GPU has no bfloat16 support; training in float32")
    if device.type == "cpu" and cpu_bf16_flags():
        return Precision(bf16=True)
    return Precision(
        False,
        f"precision: bf16: this {device.type} ({platform.machine()}) has no native bfloat16 instructions "
        "(avx512_bf16, amx_bf16 or Arm bf16), where bf16 would be slower than float32; training in float32",
    )


def store_frozen_linears_in_bf16(model: nn.Module) -> list[nn.Parameter]:
    """Cast the weight and bias of every linear layer that does not train to bfloat16 (in place).

    For LoRA under bf16 autocast: the base weights are only ever read in bfloat16, so keeping
    float32 copies would cost memory and a cast per use. Returns the parameters cast.
    """
    cast = []
    for module in model.modules():
        if not isinstance(module, (nn.Linear, LoRALinear)):
            continue
        for param in (module.weight, module.bias):
            if param is not None and not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
                cast.append(param)
    return cast


@contextlib.contextmanager
def in_float32(params: list[nn.Parameter]):
    """Hold ``params`` (bfloat16 copies of float32 weights) in float32 for a while, e.g. to generate
    validation audio with a uniform-dtype model; bfloat16 -> float32 -> bfloat16 is lossless."""
    for param in params:
        param.data = param.data.float()
    try:
        yield
    finally:
        for param in params:
            param.data = param.data.to(torch.bfloat16)
