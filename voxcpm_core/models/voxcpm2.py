"""VoxCPM2Model: VoxCPMModel with the two VoxCPM2 changes (section 4 of the VoxCPM2 architecture page).

- The residual LM reads ``fusion_concat_proj(concat(lm_h, audio_mask * e_feat))`` [.., 2H] -> [.., H]
  instead of the sum; with ``residual_lm_no_rope`` it has no rotary embedding (the config says so).
- The LocDiT condition is the two projections side by side, mu [.., 2 H_dit], which LocalDiTV2 reads as two
  prefix tokens before the time token.
Everything else, the training losses included, is VoxCPMModel's.
"""

from __future__ import annotations

import torch
from torch import nn

from voxcpm_core.config import VoxCPM2Config
from voxcpm_core.models.local_dit import LocalDiTV2
from voxcpm_core.models.voxcpm import VoxCPMModel


class VoxCPM2Model(VoxCPMModel):
    dit_class = LocalDiTV2

    def __init__(self, config: VoxCPM2Config):
        super().__init__(config)
        hidden = config.lm_config.hidden_size
        self.fusion_concat_proj = nn.Linear(2 * hidden, hidden)

    def residual_input(self, lm_h: torch.Tensor, e_feat: torch.Tensor) -> torch.Tensor:
        return self.fusion_concat_proj(torch.cat([lm_h, e_feat], dim=-1))

    def dit_condition(self, lm_h: torch.Tensor, res_h: torch.Tensor) -> torch.Tensor:
        """mu [..., 2 H_dit]: the LM part first."""
        return torch.cat([self.lm_to_dit_proj(lm_h), self.res_to_dit_proj(res_h)], dim=-1)
