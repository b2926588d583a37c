"""Linear layers whose CPU float32 matmuls run on oneDNN instead of MKL.

On AMD CPUs MKL's sgemm reaches only 60-75% of oneDNN's float32 rate at the shapes of these
models (bench/machine.py measures both), and 3-4x less at the matrix-vector shapes of generation.
Same math in float32, same weights and state-dict keys; other dtypes and devices, autocast
regions and empty inputs use ``F.linear`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T (+ bias [N]) -> [M, N] with oneDNN's float32 matmul (strided views allowed)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [None], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on 2-D x; saves x only when W needs a gradient (frozen LoRA bases keep no input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the oneDNN path for float32 CPU tensors; x [..., K] -> [..., N]."""
    fast = (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )
    if not fast:
        return F.linear(x, weight, bias)
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)  # [M, N]
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear`` above (same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
