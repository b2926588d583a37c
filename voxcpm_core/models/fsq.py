"""Finite scalar quantization bottleneck (``fsq_layer``) applied to the base LM output at audio positions."""

from __future__ import annotations

import torch
from torch import nn


class ScalarQuantizer(nn.Module):
    def __init__(self, hidden: int, latent_dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.in_proj = nn.Linear(hidden, latent_dim)
        self.out_proj = nn.Linear(latent_dim, hidden)

    def quantize(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> quantized latent [..., latent] on the grid k/scale (straight-through when training)."""
        z = torch.tanh(self.in_proj(h))
        q = torch.round(z * self.scale) / self.scale
        return z + (q - z).detach() if self.training else q

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.quantize(h))
