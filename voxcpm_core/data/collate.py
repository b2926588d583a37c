"""Training batches: one sequence per sample, text then audio patches (section 5 of the architecture page).

    ids:        t_1 .. t_n 101  0 .. 0   102
    text_mask:   1  ..  1   1   0 .. 0    1
    audio_mask:  0  ..  0   0   1 .. 1    0
    loss_mask:   0  ..  0   0   1 .. 1    0
    labels:      0  ..  0   0   0 .. 0 1  0      (1 at the last audio patch)
    feats:       0  ..  0   0  a_1..a_A   0

Samples are right-padded to the longest one with zeros (every mask 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from voxcpm_core.data.tokenizer import AUDIO_END, AUDIO_START


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


def collate(samples: Sequence[tuple[Sequence[int], torch.Tensor, int]]) -> TrainBatch:
    """samples of (text_ids, latents [A, P, D], dataset_id) -> a right-padded TrainBatch."""
    lengths = [len(ids) + len(latents) + 2 for ids, latents, _ in samples]
    B, T = len(samples), max(lengths)
    _, P, D = samples[0][1].shape
    tokens = torch.zeros(B, T, dtype=torch.long)
    text_mask, audio_mask, labels = (torch.zeros(B, T, dtype=torch.long) for _ in range(3))
    feats = torch.zeros(B, T, P, D, dtype=samples[0][1].dtype)
    for b, (ids, latents, _) in enumerate(samples):
        n, A = len(ids), len(latents)
        if A == 0:
            raise ValueError(f"sample {b} has no audio patches")
        audio = slice(n + 1, n + 1 + A)
        tokens[b, :n] = torch.as_tensor(ids, dtype=torch.long)
        tokens[b, n] = AUDIO_START
        tokens[b, n + 1 + A] = AUDIO_END
        text_mask[b, : n + 1] = 1
        text_mask[b, n + 1 + A] = 1
        audio_mask[b, audio] = 1
        labels[b, n + A] = 1
        feats[b, audio] = latents
    return TrainBatch(
        text_tokens=tokens,
        text_mask=text_mask.float(),
        audio_mask=audio_mask.float(),
        loss_mask=audio_mask.float(),
        labels=labels,
        audio_feats=feats,
        dataset_ids=torch.tensor([dataset_id for *_, dataset_id in samples], dtype=torch.long),
    )
