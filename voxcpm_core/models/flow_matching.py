"""Flow matching around the LocDiT (``feat_decoder``): training draws and loss, Euler sampler with CFG-zero-star.

Convention: t = 1 is pure noise, t = 0 is data; y = (1 - t) x1 + t z and the velocity target is z - x1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from voxcpm_core.config import CFMConfig
from voxcpm_core.models.local_dit import LocalDiT


@dataclass
class FlowDraws:
    """The random draws of one training step: ``cfg_keep`` [N] bool, ``t`` [N], ``z`` [N, D, P]."""

    cfg_keep: torch.Tensor
    t: torch.Tensor
    z: torch.Tensor

    @classmethod
    def draw(cls, n: int, feat_dim: int, patch_size: int, config: CFMConfig, device=None) -> FlowDraws:
        """Draw from torch's global RNG in the reference order, so a seed reproduces the reference's step.

        Order: cfg rand(N), noisy-cond rand(N), cond noise randn(N, D, P) (both unused while
        noise_cond_scale is 0), r then t, r-vs-t rand(N) (mean mode only), z randn(N, D, P).
        """
        shape = (n, feat_dim, patch_size)
        cfg_keep = torch.rand(n, device=device) > config.training_cfg_rate
        torch.rand(n, device=device)  # noisy-cond selection
        torch.randn(shape, device=device)  # noisy-cond noise
        cls._draw_t(n, config, device)  # r (used only in mean mode)
        t = cls._draw_t(n, config, device)
        torch.rand(n, device=device)  # r != t selection
        z = torch.randn(shape, device=device)
        return cls(cfg_keep=cfg_keep, t=t, z=z)

    def select(self, rows: torch.Tensor) -> FlowDraws:
        """The draws of ``rows`` [n] only (the rows the LocDiT runs on)."""
        return FlowDraws(self.cfg_keep[rows], self.t[rows], self.z[rows])

    @staticmethod
    def _draw_t(n: int, config: CFMConfig, device) -> torch.Tensor:
        if config.t_scheduler == "log-norm":
            return torch.sigmoid(torch.randn(n, device=device) - 0.4)  # sigmoid(Normal(-0.4, 1))
        return torch.rand(n, device=device)


class UnifiedCFM(nn.Module):
    def __init__(self, estimator: LocalDiT, config: CFMConfig):
        super().__init__()
        self.config = config
        self.estimator = estimator

    def frame_errors(
        self,
        x1: torch.Tensor,  # [N, D, P] target patches
        mu: torch.Tensor,  # [N, H_mu] (H_dit, or 2 H_dit for VoxCPM2)
        cond: torch.Tensor,  # [N, D, P] previous patches
        draws: FlowDraws,
    ) -> torch.Tensor:
        """Per-frame flow-matching error [N, P] (float32): mean over D of (pred - (z - x1))^2; callers mask and reduce."""
        mu = mu * draws.cfg_keep[:, None].to(mu.dtype)  # classifier-free dropout
        t = draws.t.to(x1.dtype)
        z = draws.z.to(x1.dtype)
        y = (1 - t[:, None, None]) * x1 + t[:, None, None] * z
        pred = self.estimator(y, mu, t, cond, torch.zeros_like(t))
        return (pred.float() - (z - x1).float()).pow(2).mean(dim=1)

    @torch.no_grad()
    def sample(
        self,
        mu: torch.Tensor,  # [N, H_mu] (H_dit, or 2 H_dit for VoxCPM2)
        cond: torch.Tensor,  # [N, D, P] previous patch
        n_timesteps: int,
        cfg_value: float,
        noise: torch.Tensor,  # [N, D, P] initial x at t = 1
        sway_coef: float = 1.0,
    ) -> torch.Tensor:
        """Euler integration from t=1 to t=0 over a sway-warped grid with CFG-zero-star guidance -> [N, D, P].

        The conditional and unconditional rows run as one batch of 2N through the LocDiT; that batch,
        the condition tokens and the time embeddings of every step are built once per call.
        """
        N = mu.shape[0]
        dit = self.estimator
        t_span = torch.linspace(1, 0, n_timesteps + 1, device=mu.device, dtype=mu.dtype)
        t_span = t_span + sway_coef * (torch.cos(math.pi / 2 * t_span) - 1 + t_span)
        zero_init_steps = max(1, int((n_timesteps + 1) * 0.04))
        steps = range(zero_init_steps + 1, n_timesteps + 1)  # CFG-zero-star: the first step(s) keep x
        times = t_span[[s - 1 for s in steps]]  # [S]
        time = dit.time_embedding(times, torch.zeros_like(times))  # [S, H_dit]
        mu_in = torch.cat([mu, torch.zeros_like(mu)])  # [2N, H_mu]: conditional rows, then unconditional
        prefix = dit.prefix_tokens(mu_in[None], time[:, None])  # [S, 2N, k, H_dit]
        cond_tokens = dit.embed_cond(torch.cat([cond, cond]))  # [2N, P', H_dit]
        x = noise
        x_in = torch.empty((2 * N, *noise.shape[1:]), device=noise.device, dtype=noise.dtype)  # [2N, D, P]
        for i, step in enumerate(steps):
            x_in[:N] = x
            x_in[N:] = x
            v_cond, v_uncond = dit.velocity(x_in, prefix[i], cond_tokens).chunk(2)
            # optimal scale s* projecting the conditional onto the unconditional velocity, per sample
            dot = (v_cond.reshape(N, -1) * v_uncond.reshape(N, -1)).sum(1)
            s_star = (dot / (v_uncond.reshape(N, -1).pow(2).sum(1) + 1e-8)).view(N, 1, 1)
            v = v_uncond * s_star + cfg_value * (v_cond - v_uncond * s_star)
            x = x - (t_span[step - 1] - t_span[step]) * v
        return x
