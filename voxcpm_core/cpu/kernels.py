"""CPU kernels swapped into a built model: linear products on oneDNN (optionally from prepacked weights)
and attention as plain matmuls over few keys.

Model code uses plain ``nn.Linear`` and SDPA; ``use_cpu_kernels(model)`` changes how a CPU model computes,
not what: parameters, buffers and state-dict keys stay, the math is the same up to float rounding.
Training applies it where the model is set up, generation where it is loaded; generation then also
prepacks weights (``pack_weights``). Two model hooks opt modules in beyond ``nn.Linear``:
``linear_product`` (LoRA layers: the product with the frozen weight) and ``small_attention_keys``
(attention layers: up to how many keys the plain-matmul attention runs).

On AMD CPUs oneDNN multiplies these models' float32 shapes faster than MKL's sgemm, most of all at the
matrix-vector shapes of generation, and a prepacked weight spares oneDNN a reorder of the weight on every
call (bench/machine.py measures each path). Autocast regions, other dtypes and empty inputs use
``F.linear`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxcpm_core.cpu.capability import cpu

ONEDNN = cpu().onednn
PACKABLE_DTYPES = (torch.float32, torch.bfloat16) if cpu().onednn_bf16 else (torch.float32,)
# Up to this many keys a CPU attention layer runs as batched matmuls (models.minicpm.small_attention),
# forward and backward; beyond, SDPA's kernels win and keep no [T, S] probabilities.
SMALL_ATTENTION_KEYS = 128


def onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T (+ bias [N]) -> [M, N] on oneDNN; ``b`` plain (strided views allowed) or from PackedWeight."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [None], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on 2-D x; saves x only when W needs a gradient (frozen LoRA bases keep no input).

    x is made contiguous first: for the transposed strided view of a row slice oneDNN's weight-gradient
    matmul falls back to its slow reference kernel.
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


class OneDNNProduct:
    """x W^T + b of one layer by ``linear``, from the prepacked weight ``pack_weights`` gives it (or none)."""

    def __init__(self):
        self.packed: PackedWeight | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, weight, bias, self.packed)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose product is its ``OneDNNProduct``; ``use_cpu_kernels`` swaps the class of an
    existing ``nn.Linear``, so its parameters and state-dict keys are the ones it had."""

    linear_product: OneDNNProduct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_product(x, self.weight, self.bias)


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def _onednn_candidate(module: nn.Module) -> bool:
    """A plain ``nn.Linear``, or a module whose ``linear_product`` hook is not on oneDNN yet."""
    if type(module) is nn.Linear:
        return True
    return hasattr(module, "linear_product") and not isinstance(module.linear_product, OneDNNProduct)


def use_cpu_kernels(model: nn.Module) -> int:
    """Swap this CPU's kernels into ``model`` (in place; a no-op unless all its parameters are on the CPU).

    Where torch has oneDNN (``cpu().onednn``): every ``nn.Linear`` becomes a ``OneDNNLinear`` and every
    module with a ``linear_product`` hook (a LoRA layer's frozen product) gets a ``OneDNNProduct``. Every
    module with a ``small_attention_keys`` hook attends over up to ``SMALL_ATTENTION_KEYS`` keys with
    plain matmuls. Idempotent; apply again after adding LoRA layers or merging them away, and not to a
    model bound for another device. Returns how many linear products it put on oneDNN.
    """
    if not _on_cpu(model):
        return 0
    swapped = 0
    for module in model.modules():
        if hasattr(module, "small_attention_keys"):
            module.small_attention_keys = SMALL_ATTENTION_KEYS
        if ONEDNN and _onednn_candidate(module):
            if type(module) is nn.Linear:
                module.__class__ = OneDNNLinear
            module.linear_product = OneDNNProduct()
            swapped += 1
    return swapped


def pack_weights(model: nn.Module, enabled: bool = True) -> int:
    """Give every product ``use_cpu_kernels`` put on oneDNN a prepacked weight, or drop them.

    Costs one more copy of those weights in memory; only CPU inference (no grad) reads it.
    Returns the number of products changed.
    """
    if enabled and not ONEDNN:
        return 0
    layers = [m for m in model.modules() if isinstance(getattr(m, "linear_product", None), OneDNNProduct)]
    for layer in layers:
        product = layer.linear_product
        product.packed = PackedWeight() if enabled else None
        if enabled and layer.weight.dtype in PACKABLE_DTYPES and layer.weight.device.type == "cpu":
            product.packed.get(layer.weight)  # now, in one go, rather than at the first call
    return len(layers)
