"""Training batches: samples of text ids and audio latents -> one right-padded ``TrainBatch`` (its layouts are
in ``voxcpm_core.models.batch``).

A sample is an ``Item``, or the plain tuple (text_ids, latents, dataset_id). Each row is laid out on its own
(plain, with a reference clip, or ``is_prompt``), so rows of every layout share a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from voxcpm_core.data.tokenizer import AUDIO_END, AUDIO_START, REF_AUDIO_END, REF_AUDIO_START
from voxcpm_core.models.batch import TrainBatch


@dataclass(frozen=True)
class Item:
    """One training sample."""

    text_ids: Sequence[int]
    latents: torch.Tensor  # [A, P, D] target patches
    dataset_id: int = 0
    ref_latents: torch.Tensor | None = None  # [R, P, D] a reference clip of the voice (VoxCPM2), or None
    is_prompt: bool = False  # the row conditions only: no loss

    @classmethod
    def of(cls, sample: Item | tuple) -> Item:
        return sample if isinstance(sample, Item) else cls(*sample)


def _segments(item: Item) -> list[tuple[str, object]]:
    """The row as (kind, content) runs: ("text", ids) or ("ref"/"audio", patches)."""
    start, end = (REF_AUDIO_START, REF_AUDIO_END) if item.is_prompt else (AUDIO_START, AUDIO_END)
    row: list[tuple[str, object]] = []
    if item.ref_latents is not None and len(item.ref_latents):
        row += [("text", [REF_AUDIO_START]), ("ref", item.ref_latents), ("text", [REF_AUDIO_END])]
    return row + [("text", [*item.text_ids, start]), ("audio", item.latents), ("text", [end])]


def collate(samples: Sequence[Item | tuple]) -> TrainBatch:
    """samples -> a right-padded TrainBatch; the loss falls on target patches of non-prompt rows only."""
    items = [Item.of(sample) for sample in samples]
    rows = [_segments(item) for item in items]
    B, T = len(items), max(sum(len(content) for _, content in row) for row in rows)
    _, P, D = items[0].latents.shape
    tokens = torch.zeros(B, T, dtype=torch.long)
    text_mask, audio_mask, loss_mask, labels = (torch.zeros(B, T, dtype=torch.long) for _ in range(4))
    feats = torch.zeros(B, T, P, D, dtype=items[0].latents.dtype)
    for b, (item, row) in enumerate(zip(items, rows, strict=True)):
        if len(item.latents) == 0:
            raise ValueError(f"sample {b} has no audio patches")
        at = 0
        for kind, content in row:
            span = slice(at, at + len(content))
            if kind == "text":
                tokens[b, span] = torch.as_tensor(content, dtype=torch.long)
                text_mask[b, span] = 1
            else:
                audio_mask[b, span] = 1
                feats[b, span] = content
                if kind == "audio":
                    labels[b, span.stop - 1] = 1  # stop at the last target patch
                    loss_mask[b, span] = 0 if item.is_prompt else 1
            at = span.stop
    return TrainBatch(
        text_tokens=tokens,
        text_mask=text_mask.float(),
        audio_mask=audio_mask.float(),
        loss_mask=loss_mask.float(),
        labels=labels,
        audio_feats=feats,
        dataset_ids=torch.tensor([item.dataset_id for item in items], dtype=torch.long),
    )
