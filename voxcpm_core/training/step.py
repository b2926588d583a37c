"""One optimizer step: the code the training loop runs and bench/train.py measures.

    fwd    per micro-batch: flow-matching draws, batch to the device, forward, lambdas-weighted loss
    bwd    per micro-batch: backward (under DDP the gradients are all-reduced on the last one only)
    clip   the gradient norm, clipped to max_grad_norm
    optim  AdamW (skipped when the loss or gradient is NaN/inf), gradients cleared
    then   the LR schedule advances (also after a skipped update)

A caller may pass ``phase``: a function of the phase name above returning the context each phase
runs in, e.g. to time or count it; by default the phases run bare.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from voxcpm_core.cpu.kernels import use_cpu_kernels
from voxcpm_core.cpu.memory import reusing_freed_memory
from voxcpm_core.data.collate import TrainBatch
from voxcpm_core.training.config import TrainConfig
from voxcpm_core.training.distributed import Dist
from voxcpm_core.training.losses import loss_metrics, patch_sums, sample_draws, weighted_loss_sum
from voxcpm_core.training.optim import build_optimizer, build_scheduler
from voxcpm_core.training.precision import resolve_precision, store_frozen_linears_in_bf16

PHASES = ("fwd", "bwd", "clip", "optim")
Phase = Callable[[str], AbstractContextManager]  # phase name -> the context that phase runs in


def bare(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class StepResult:
    metrics: dict[str, float]  # loss/diff, loss/stop, loss/total (means over the step's patches), lr, grad_norm
    sums: torch.Tensor  # [1 + datasets, 3] patch_sums rows summed over micro-batches and ranks: all, then per dataset
    updated: bool  # False: the loss or gradient was NaN/inf, so AdamW skipped this step


class TrainStep:
    """A model set up to train as ``cfg`` says (precision, checkpointing, DDP), with its AdamW and LR schedule.

    ``step(batches, index)`` takes optimizer step ``index`` (0-based) over CPU micro-batches.
    ``dataset_ids`` are the ids the batches may carry (the losses are also summed per dataset).
    """

    def __init__(
        self,
        model: nn.Module,
        trainable: list[tuple[str, nn.Parameter]],
        cfg: TrainConfig,
        lora: bool,
        dist: Dist,
        dataset_ids: Iterable[int] = (0,),
    ):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.model = model.train()
        use_cpu_kernels(model)  # oneDNN linears and few-key attention where this CPU has them
        model.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.precision = resolve_precision(cfg.precision, self.device)
        # LoRA under bf16 reads the frozen weights only in bf16: no float32 copies, no per-step casts
        self.bf16_weights = store_frozen_linears_in_bf16(model) if self.precision.bf16 and lora else []
        self.wrapped = dist.wrap(model)
        self.params = [p for _, p in trainable]
        self.optimizer = build_optimizer(trainable, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps)
        self.dataset_index = {d: k for k, d in enumerate(sorted(set(dataset_ids)))}
        self.cfm = model.config.dit_config.cfm_config

    def keeping_freed_memory(self) -> AbstractContextManager:
        """The block steps run in: on CPU each step frees and reallocates GBs of activations (and gradients),
        so freed memory is kept for the next step instead of being faulted in again; handed back at the end."""
        return reusing_freed_memory(self.device.type == "cpu")

    def __call__(self, batches: list[TrainBatch], index: int, phase: Phase = bare) -> StepResult:
        dist, device, cfg = self.dist, self.device, self.cfg
        lr = self.optimizer.param_groups[0]["lr"]
        total_patches = dist.sum(torch.tensor([float(sum(b.loss_mask.sum() for b in batches))], device=device))
        scale = dist.world_size / total_patches.clamp(min=1)  # DDP averages gradients over ranks: we want the sum
        sums = torch.zeros(1 + len(self.dataset_index), 3, device=device)
        for i, batch in enumerate(batches):
            with dist.syncing(self.wrapped, sync=i == len(batches) - 1):
                with phase("fwd"):
                    rows = self._rows(self.wrapped, batch, index)
                    loss = weighted_loss_sum(rows, cfg.lambdas) * scale
                with phase("bwd"):
                    loss.backward()
            rows = rows.detach()
            sums[0] += rows.sum(0)
            datasets = torch.tensor([self.dataset_index[int(d)] for d in batch.dataset_ids], device=device)
            sums.index_add_(0, 1 + datasets, rows)
        with phase("clip"):
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        sums = dist.sum(sums)
        metrics = loss_metrics(sums[0], cfg.lambdas) | {"lr": lr, "grad_norm": grad_norm}
        finite = math.isfinite(metrics["loss/total"]) and math.isfinite(grad_norm)
        with phase("optim"):
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # freed grads let backward reuse activation memory: lower peak
        with _quiet_scheduler_order():
            self.scheduler.step()
        return StepResult(metrics, sums, finite)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[TrainBatch], draw_index: int) -> torch.Tensor:
        """``patch_sums`` rows summed over ``batches`` [3], forward only, on this rank (put the model in eval first)."""
        sums = torch.zeros(3, device=self.device)
        for batch in batches:
            sums += self._rows(self.model, batch, draw_index).sum(0)
        return sums

    def _rows(self, model: nn.Module, batch: TrainBatch, draw_index: int) -> torch.Tensor:
        """``patch_sums`` of the forward of a CPU batch, its noise drawn for step ``draw_index``."""
        draws = sample_draws(batch, self.cfm, self.cfg.seed, draw_index, self.device)
        batch = batch.to(self.device)
        with self.precision.autocast(self.device):
            out = model(batch, draws)
        return patch_sums(out, batch)


@contextlib.contextmanager
def _quiet_scheduler_order():
    """A skipped (NaN) first step calls scheduler.step() before optimizer.step(); that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        yield
