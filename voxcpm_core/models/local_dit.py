"""LocDiT (``feat_decoder.estimator``): predicts the flow velocity of one patch from mu, time and the previous patch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voxcpm_core.config import LMConfig
from voxcpm_core.models.minicpm import MiniCPMModel


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [N] -> [N, dim] = [sin(1000 t f), cos(1000 t f)], f_k = exp(-k ln(10000) / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1))
    )
    args = 1000 * t[:, None] * freqs[None, :]  # [N, half] float32; 1000 * t is taken first, in t's dtype
    return torch.cat([args.sin(), args.cos()], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class LocalDiT(nn.Module):
    def __init__(self, config: LMConfig, feat_dim: int):
        super().__init__()
        self.hidden = hidden = config.hidden_size
        self.in_proj = nn.Linear(feat_dim, hidden)
        self.cond_proj = nn.Linear(feat_dim, hidden)
        self.out_proj = nn.Linear(hidden, feat_dim)
        self.time_mlp = TimestepMLP(hidden)
        self.delta_time_mlp = TimestepMLP(hidden)
        self.decoder = MiniCPMModel(config, causal=False)

    def forward(
        self,
        x: torch.Tensor,  # [N, D, P] noisy patch
        mu: torch.Tensor,  # [N, H_mu] condition from the LMs
        t: torch.Tensor,  # [N]
        cond: torch.Tensor,  # [N, D, P'] previous patch
        dt: torch.Tensor,  # [N] (always 0 outside mean mode)
    ) -> torch.Tensor:
        """-> velocity [N, D, P]."""
        return self.velocity(x, self.prefix_tokens(mu, self.time_embedding(t, dt)), self.embed_cond(cond))

    def time_embedding(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """t, dt [N] -> [N, H_dit]."""
        dtype = self.in_proj.weight.dtype
        tt = self.time_mlp(timestep_embedding(t, self.hidden).to(dtype))
        return tt + self.delta_time_mlp(timestep_embedding(dt, self.hidden).to(dtype))

    def prefix_tokens(self, mu: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """mu [..., H_dit] and the time embedding [..., H_dit] (broadcastable) -> the tokens before the
        condition, [..., 1, H_dit]: one token, their sum."""
        return (mu + time)[..., None, :]

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Previous patch [N, D, P'] -> its tokens [N, P', H_dit]."""
        return self.cond_proj(cond.transpose(1, 2))

    def velocity(
        self,
        x: torch.Tensor,  # [N, D, P] noisy patch
        prefix: torch.Tensor,  # [N, k, H_dit] from prefix_tokens
        cond_tokens: torch.Tensor,  # [N, P', H_dit] from embed_cond
    ) -> torch.Tensor:
        """The transformer over [prefix, cond tokens, x tokens] -> velocity [N, D, P] at the x positions.

        The sampler calls this directly with ``prefix`` and ``cond_tokens`` computed once per patch.
        """
        x = self.in_proj(x.transpose(1, 2))  # [N, P, H_dit]
        seq = torch.cat([prefix, cond_tokens, x], dim=1)  # [N, k+P'+P, H_dit]
        out = self.decoder(seq, outputs=slice(prefix.shape[1] + cond_tokens.shape[1], None))  # [N, P, H_dit]
        return self.out_proj(out).transpose(1, 2)  # [N, D, P]


class LocalDiTV2(LocalDiT):
    """VoxCPM2's LocDiT: mu (the LM and residual-LM projections side by side, [..., 2 H_dit]) enters as two
    tokens of its own, followed by the time token: [mu_lm, mu_res, time, cond..., x...]."""

    def prefix_tokens(self, mu: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """mu [..., 2 H_dit], time [..., H_dit] (broadcastable) -> [..., 3, H_dit]."""
        mu_tokens = mu.unflatten(-1, (-1, self.hidden))  # [..., 2, H_dit]
        batch = torch.broadcast_shapes(mu_tokens.shape[:-2], time.shape[:-1])
        return torch.cat(
            [mu_tokens.expand(*batch, *mu_tokens.shape[-2:]), time[..., None, :].expand(*batch, 1, self.hidden)], dim=-2
        )
