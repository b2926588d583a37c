"""The training batch ``VoxCPMModel.forward`` reads: one sequence per sample, text then audio patches
(section 5 of the architecture page). ``voxcpm_core.data.collate`` builds it.

    ids:        t_1 .. t_n 101  0 .. 0   102
    text_mask:   1  ..  1   1   0 .. 0    1
    audio_mask:  0  ..  0   0   1 .. 1    0
    loss_mask:   0  ..  0   0   1 .. 1    0
    labels:      0  ..  0   0   0 .. 0 1  0      (1 at the last audio patch)
    feats:       0  ..  0   0  a_1..a_A   0

VoxCPM2 rows may instead carry a reference clip r_1..r_R before the text (the loss stays on the target):

    ids:        103  0 .. 0  104  t_1 .. t_n 101  0 .. 0   102
    text_mask:   1   0 .. 0   1    1  ..  1   1   0 .. 0    1
    audio_mask:  0   1 .. 1   0    0  ..  0   0   1 .. 1    0
    loss_mask:   0   0 .. 0   0    0  ..  0   0   1 .. 1    0
    feats:       0  r_1..r_R  0    0  ..  0   0  a_1..a_A   0

or be an ``is_prompt`` row, ``t_1..t_n 103 a_1..a_A 104``, whose loss_mask is all 0.
Samples are right-padded to the longest one with zeros (every mask 0).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TrainBatch:
    text_tokens: torch.Tensor  # [B, T] long
    text_mask: torch.Tensor  # [B, T] float
    audio_mask: torch.Tensor  # [B, T] float
    loss_mask: torch.Tensor  # [B, T] float
    labels: torch.Tensor  # [B, T] long, 1 = stop
    audio_feats: torch.Tensor  # [B, T, P, D]
    dataset_ids: torch.Tensor  # [B] long

    def to(self, device) -> TrainBatch:
        return TrainBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
