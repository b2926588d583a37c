"""LocEnc (``feat_encoder``): summarises each patch of latent frames into one vector via a learned special token."""

from __future__ import annotations

import torch
from torch import nn

from voxcpm_core.config import LMConfig
from voxcpm_core.models.minicpm import MiniCPMModel


class LocalEncoder(nn.Module):
    def __init__(self, config: LMConfig, feat_dim: int):
        super().__init__()
        hidden = config.hidden_size
        self.special_token = nn.Parameter(torch.randn(1, 1, 1, hidden))
        self.in_proj = nn.Linear(feat_dim, hidden)
        self.encoder = MiniCPMModel(config, causal=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, T, P, D] -> [B, T, H_enc]: the special token's output for each patch."""
        B, T, P, _ = feats.shape
        H = self.special_token.shape[-1]
        x = self.in_proj(feats)  # [B, T, P, H_enc]
        x = torch.cat([self.special_token.expand(B, T, 1, H), x], dim=2)  # [B, T, P+1, H_enc]
        out = self.encoder(x.reshape(B * T, P + 1, H), outputs=slice(0, 1))  # each patch its own sequence
        return out.reshape(B, T, H)  # the special token's output (B*T may be 0)
