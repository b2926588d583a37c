"""Linear layers whose CPU matmuls run on oneDNN, optionally from prepacked weights.

On AMD CPUs MKL's sgemm reaches only 60-75% of oneDNN's float32 rate at the shapes of these
models (bench/machine.py measures both), and 3-4x less at the matrix-vector shapes of generation.
For inference, ``pack_weights`` keeps a oneDNN-blocked copy of each weight (``PackedWeight``):
without it oneDNN reorders the weight on every call, so prepacked weights stream ~2x faster in
bfloat16 at every row count and ~1.6x faster in float32 at the 18 rows of the CFG-batched LocDiT.
Same math, same weights and state-dict keys; other devices, autocast regions and empty inputs use
``F.linear`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxcpm_core.cpu.capability import cpu

ONEDNN = cpu().onednn
PACKABLE_DTYPES = (torch.float32, torch.bfloat16) if cpu().onednn_bf16 else (torch.float32,)


def onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T (+ bias [N]) -> [M, N] on oneDNN; ``b`` plain (strided views allowed) or from PackedWeight."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [None], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on 2-D x; saves x only when W needs a gradient (frozen LoRA bases keep no input).

    x is made contiguous first: oneDNN falls back to a reference kernel for the transposed strided
    view of a row slice in the weight gradient (0.1 GFLOP/s, ~1 s of a full fine-tuning step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # [M, N]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_mm(grad_out, weight.t())  # [M, K]
        if ctx.needs_input_grad[1]:
            grad_w = onednn_mm(grad_out.t(), x.t())  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b


class PackedWeight:
    """A oneDNN-blocked copy of one weight for CPU inference, redone when the weight changes.

    The copy is keyed by the weight's storage, version counter and dtype, so ``.to()``, ``copy_``,
    ``load_state_dict`` and LoRA merges are picked up on the next call.
    """

    ROWS_HINT = 16  # the row count oneDNN picks its blocking for (bfloat16 is insensitive to it)

    def __init__(self):
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if key != self._key:
            self._packed = None  # release the stale copy before making the new one
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.ROWS_HINT)
            self._key = key
        return self._packed


def _use_packed(x: torch.Tensor, packed: PackedWeight | None) -> bool:
    if packed is None or torch.is_grad_enabled() or x.dtype not in PACKABLE_DTYPES:
        return False
    # one float32 row (an LM decode step) streams fastest from the plain layout
    return x.dtype == torch.bfloat16 or x.numel() > x.shape[-1]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: PackedWeight | None = None
) -> torch.Tensor:
    """``F.linear`` on oneDNN for CPU tensors (float32 always, prepacked ``packed`` in inference); x [..., K] -> [..., N]."""
    fast = (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )
    if fast and _use_packed(x, packed):
        out = onednn_mm(x.reshape(-1, x.shape[-1]), packed.get(weight), bias)
    elif fast and x.dtype == torch.float32:
        out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)  # [M, N]
    else:
        return F.linear(x, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear`` above (same parameters and keys)."""

    packed: PackedWeight | None = None  # set by pack_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def pack_weights(model: nn.Module, enabled: bool = True) -> int:
    """Give every module with a ``packed`` slot (``Linear``, ``LoRALinear``) a prepacked weight, or drop them.

    Costs one more copy of those weights in memory; only CPU inference (no grad) reads it.
    Returns the number of modules changed.
    """
    if enabled and not ONEDNN:
        return 0
    modules = [m for m in model.modules() if hasattr(type(m), "packed")]
    for module in modules:
        module.packed = PackedWeight() if enabled else None
        if enabled and module.weight.dtype in PACKABLE_DTYPES and module.weight.device.type == "cpu":
            module.packed.get(module.weight)  # now, in one go, rather than at the first call
    return len(modules)
