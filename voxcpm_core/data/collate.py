"""Training batches: samples of text ids and audio latents -> one right-padded ``TrainBatch`` (its layout is
in ``voxcpm_core.models.batch``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from voxcpm_core.data.tokenizer import AUDIO_END, AUDIO_START, sequence_length
from voxcpm_core.models.batch import TrainBatch


def collate(samples: Sequence[tuple[Sequence[int], torch.Tensor, int]]) -> TrainBatch:
    """samples of (text_ids, latents [A, P, D], dataset_id) -> a right-padded TrainBatch."""
    lengths = [sequence_length(len(ids), len(latents)) for ids, latents, _ in samples]
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
