"""Helpers shared by the parity tests: read the official reference tensors and compare against them."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import load_file

from voxcpm_core.models.batch import TrainBatch
from voxcpm_core.models.flow_matching import FlowDraws

RTOL = 1e-5  # relative to the largest magnitude of the reference tensor


@functools.cache
def reference_tensors(preset_dir: Path) -> dict[str, torch.Tensor]:
    """``reference.safetensors`` of a preset (cached: treat as read-only)."""
    return load_file(Path(preset_dir) / "reference.safetensors")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.detach().float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"max abs error {err:.3g} vs reference scale {scale:.3g}"


def reference_batch(ref: dict, prefix: str = "train") -> TrainBatch:
    """The official packer's batch (``{prefix}.batch.*``: ``train`` in V1 fixtures, ``train.plain`` ... in V2)."""
    get = lambda name: ref[f"{prefix}.batch.{name}"]  # noqa: E731
    return TrainBatch(
        text_tokens=get("text_tokens").long(),
        text_mask=get("text_mask").float(),
        audio_mask=get("audio_mask").float(),
        loss_mask=get("loss_mask").float(),
        labels=get("labels").long(),
        audio_feats=get("audio_feats"),
        dataset_ids=torch.zeros(get("text_tokens").shape[0], dtype=torch.long),
    )


def reference_draws(ref: dict, prefix: str = "train") -> FlowDraws:
    """The flow-matching draws of the reference training step (``{prefix}.rng.*``)."""
    get = lambda name: ref[f"{prefix}.rng.{name}"]  # noqa: E731
    return FlowDraws(cfg_keep=get("cfg_mask").bool(), t=get("t"), z=get("z"))
