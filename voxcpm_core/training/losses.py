"""The training loss: flow-matching noise per sample, per-sample loss sums, the lambdas-weighted total.

A step's loss is the mean over every audio patch of the step, whichever micro-batch or rank a patch
landed in: each forward yields ``patch_sums`` rows (losses x patches, patches), rows are summed
over micro-batches and ranks, and only then divided by the patch total.
"""

from __future__ import annotations

import hashlib

import torch

from voxcpm_core.config import CFMConfig
from voxcpm_core.data.collate import TrainBatch
from voxcpm_core.models.flow_matching import FlowDraws
from voxcpm_core.training.config import LossWeights


def _sample_seed(seed: int, step: int, tokens: torch.Tensor, feats: torch.Tensor) -> int:
    digest = hashlib.blake2b(f"{seed}|{step}|".encode(), digest_size=8)
    digest.update(tokens.numpy().tobytes())
    digest.update(feats.float().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def sample_draws(batch: TrainBatch, cfm: CFMConfig, seed: int, step: int, device: torch.device) -> FlowDraws:
    """Flow-matching draws for a CPU batch, each sample's rows seeded by (seed, step, its tokens and latents).

    The draws of a sample are the reference's draw order over its own positions, so they do not
    depend on the other samples, the padding, the rank or the micro-batch it lands in.
    """
    B, T, P, D = batch.audio_feats.shape
    lengths = (batch.text_mask + batch.audio_mask).gt(0).sum(1).tolist()  # real positions per sample
    cfg_keep, t, z = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T), torch.zeros(B, T, D, P)
    with torch.random.fork_rng(devices=[]):
        for b, L in enumerate(lengths):
            torch.manual_seed(_sample_seed(seed, step, batch.text_tokens[b, :L], batch.audio_feats[b, :L]))
            d = FlowDraws.draw(L, D, P, cfm)
            cfg_keep[b, :L], t[b, :L], z[b, :L] = d.cfg_keep, d.t, d.z
    return FlowDraws(cfg_keep.flatten().to(device), t.flatten().to(device), z.flatten(0, 1).to(device))


def patch_sums(out: dict[str, torch.Tensor], batch: TrainBatch) -> torch.Tensor:
    """[B, 3] per sample: (loss/diff x patches, loss/stop x patches, audio patches), float32."""
    patches = batch.loss_mask.sum(1).float()  # [B]
    diff, stop = out["loss/diff_per_sample"].float(), out["loss/stop_per_sample"].float()
    return torch.stack([diff * patches, stop * patches, patches], 1)


def weighted(lambdas: LossWeights, diff, stop):
    """The total loss of (loss/diff, loss/stop): floats, or tensors to backpropagate through."""
    return lambdas.diff * diff + lambdas.stop * stop


def weighted_loss_sum(rows: torch.Tensor, lambdas: LossWeights) -> torch.Tensor:
    """The total loss summed over ``patch_sums`` rows (divide by the step's patch total for the mean)."""
    return weighted(lambdas, rows[:, 0].sum(), rows[:, 1].sum())


def mean_losses(sums: torch.Tensor) -> tuple[float, float]:
    """(loss/diff, loss/stop) per audio patch from a sum of ``patch_sums`` rows [3]."""
    patches = max(float(sums[2]), 1)
    return float(sums[0]) / patches, float(sums[1]) / patches


def loss_metrics(sums: torch.Tensor, lambdas: LossWeights, prefix: str = "") -> dict[str, float]:
    """``{prefix}loss/diff``, ``/stop`` and ``/total`` from a sum of ``patch_sums`` rows [3]."""
    diff, stop = mean_losses(sums)
    return {f"{prefix}loss/diff": diff, f"{prefix}loss/stop": stop, f"{prefix}loss/total": weighted(lambdas, diff, stop)}
