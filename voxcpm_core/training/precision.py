"""Training precision: which dtype the matmuls run in, and how the model is set up for it.

    fp32   everything in float32.
    bf16   matmuls in bfloat16 under autocast, on every device. On a CPU without native bf16 dot
           products (``voxcpm_core.cpu.capability``) the same numerics are emulated, slower, with a notice.
           LoRA: the frozen linear weights are stored in bfloat16 (half the memory, no per-step
           weight casts); adapters, embeddings, norms and the residual stream stay float32.
           Full fine-tuning keeps float32 master weights (autocast casts them per step).
    auto   whichever is faster here: bf16 on CUDA with bf16 support and on CPUs with native bf16,
           fp32 elsewhere (bench/machine.py: an AVX2 CPU multiplies bf16 several times slower than fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from voxcpm_core.cpu import capability
from voxcpm_core.models.lora import LoRALinear


@dataclass(frozen=True)
class Precision:
    bf16: bool  # matmuls in bfloat16 (autocast)
    notice: str | None = None  # what the user should know about the choice (emulation, a fallback)

    def autocast(self, device: torch.device):
        """The autocast region of a forward (and of generation with a bf16 model); a no-op in fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware (then bf16 is the faster choice there)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and capability.cpu().native_bf16


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision a run uses for the YAML's ``precision`` on ``device``."""
    native = native_bf16(device)
    if requested == "fp32" or (requested == "auto" and not native):
        return Precision(bf16=False)
    if native or device.type not in ("cuda", "cpu"):
        return Precision(bf16=True)
    if device.type == "cuda":
        return Precision(False, f"precision: {requested}: this GPU has no bfloat16 support; training in float32")
    return Precision(True, f"{capability.bf16_emulation_notice('precision: bf16')}; precision: auto picks the faster one")


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
