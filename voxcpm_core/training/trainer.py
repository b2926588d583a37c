"""The fine-tuning recipe behind `voxcpm train full` and `voxcpm train lora`: one explicit loop.

    setup  model (LoRA applied before the weights load) -> resume point -> data (latent cache, batches)
    step   grad_accum_steps micro-batches -> token-weighted loss -> backward (DDP syncs on the last)
           -> clip -> AdamW (skipped when the loss is NaN/inf) -> LR schedule
    then   log every log_interval, validate every valid_interval, save every save_interval and at the end

The loss of a step is the lambdas-weighted mean over every audio patch of the step, across
micro-batches and ranks, so N ranks with grad_accum_steps 1 train exactly like one process with
grad_accum_steps N. The flow-matching noise of a sample is seeded by (seed, step, the sample's
content), never by the batch it lands in: a resumed run and a DDP run draw what an uninterrupted
single-process run draws. Under torchrun, ranks shard the batches and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from voxcpm_core.api import resolve_model_dir
from voxcpm_core.config import CFMConfig
from voxcpm_core.cpu.memory import keep_freed_memory
from voxcpm_core.data.audio import write_wav
from voxcpm_core.data.collate import TrainBatch
from voxcpm_core.data.pipeline import DataStats, DroppedSample, PreparedData, prepare_training_data
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.generation.sampling import SamplingOptions, generate
from voxcpm_core.io.checkpoint import (
    LoadedModel,
    load_lora_dir,
    load_model_dir,
    write_lora_files,
    write_model_files,
)
from voxcpm_core.models.flow_matching import FlowDraws
from voxcpm_core.models.lora import LoRAConfig, load_lora_state_dict, lora_state_dict
from voxcpm_core.training.config import LossWeights, TrainConfig
from voxcpm_core.training.metrics import TrainLogger
from voxcpm_core.training.optim import build_optimizer, build_scheduler, select_trainable
from voxcpm_core.training.precision import in_float32, resolve_precision, store_frozen_linears_in_bf16
from voxcpm_core.training.state import (
    capture_rng,
    find_latest,
    load_optimizer_and_scheduler,
    read_training_state,
    restore_rng,
    save_checkpoint,
    step_dir_name,
)

MODES = ("full", "lora")
DEFAULT_LORA = LoRAConfig(enable_lm=True, enable_dit=True)  # `train lora` without a lora: section
MAX_BAD_STEPS = 10  # NaN/inf steps in a row before training stops
VAL_SAMPLES = 2  # validation texts spoken at every validation
VAL_DRAW_STEP = -1  # validation uses the same noise every time, so its losses compare across steps
CONFIG_COPY = "train_config.yaml"
_DDP_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters


class Reporter:
    """Where the loop reports progress; the CLI passes a rich implementation. All methods are optional."""

    def encoding(self, done: int, total: int) -> None:
        """VAE encoding of clips missing from the latent cache."""

    def start(self, step: int, total: int) -> None:
        """The loop starts at ``step`` (non-zero on resume) of ``total``."""

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """After every optimizer step (``step`` counts finished steps)."""

    def message(self, text: str) -> None:
        """A notice or warning for the user."""

    def finish(self) -> None:
        """The loop is over (finished, interrupted or failed)."""


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        """NCCL on CUDA, gloo on CPU; one CUDA device per local rank."""
        cuda = torch.cuda.is_available()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        owns = not torch_dist.is_initialized()
        if owns:
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device, owns)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- setup


def lora_for_mode(cfg: TrainConfig, mode: str) -> LoRAConfig | None:
    """The adapter to train: none for ``full`` (a lora: section is then an error), the YAML's or the defaults for ``lora``."""
    if mode not in MODES:
        raise VoxCPMError(f"unknown training mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "full":
        if cfg.lora is not None:
            raise VoxCPMError(
                f"{cfg.source}: has a 'lora:' section but `voxcpm train full` trains every weight; "
                f"run `voxcpm train lora --config {cfg.source}`, or delete the lora: section for full fine-tuning"
            )
        return None
    lora = cfg.lora or DEFAULT_LORA
    if not (lora.enable_lm or lora.enable_dit or lora.enable_proj):
        raise VoxCPMError(
            f"{cfg.source}: lora: enable_lm, enable_dit and enable_proj are all false, so nothing would train; "
            "set lora.enable_lm: true and/or lora.enable_dit: true"
        )
    return lora


@dataclass
class Session:
    """Everything built before the first step; shared by the loop and ``--dry-run``."""

    cfg: TrainConfig
    mode: str
    lora: LoRAConfig | None
    model_dir: Path  # the pretrained model directory
    loaded: LoadedModel  # the model to train (weights from the resume checkpoint if any)
    data: PreparedData
    trainable: list[tuple[str, nn.Parameter]]
    resume_from: Path | None
    resume_state: dict | None


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_session(cfg: TrainConfig, mode: str, reporter: Reporter, skip_bad: bool, dist: Dist) -> Session:
    lora = lora_for_mode(cfg, mode)
    if mode == "lora" and cfg.lora is None:
        reporter.message("no lora: section in the config; using LoRA defaults (LM + DiT, q/k/v/o_proj, r 8, alpha 16)")
    if cfg.distribute and not dist.enabled:
        reporter.message("distribute: true, but this is a single process; launch with torchrun --nproc_per_node=N to use N devices")
    if cfg.pretrained_path is not None and not cfg.pretrained_path.is_dir():
        raise VoxCPMError(
            f"{cfg.source}: pretrained_path: {cfg.pretrained_path} is not a directory; point it at a model "
            "directory (config.json, model.safetensors, audiovae.pth, tokenizer files)"
        )
    model_dir = resolve_model_dir(cfg.pretrained_path or cfg.hf_model_id)
    resume_from = find_latest(cfg.save_path)
    resume_state = read_training_state(resume_from) if resume_from else None
    if resume_state is not None and resume_state.get("mode", mode) != mode:
        raise VoxCPMError(
            f"{resume_from}: written by `voxcpm train {resume_state['mode']}`; resume it with that command, "
            f"or set another save_path to start a {mode} run"
        )
    _seed_everything(cfg.seed + dist.rank)  # before LoRA init: rank 0 starts from what one process would
    if mode == "full" and resume_from is not None:
        loaded = load_model_dir(resume_from, device=dist.device, dtype=torch.float32)
    else:
        loaded = load_model_dir(model_dir, lora=lora, device=dist.device, dtype=torch.float32)
    if mode == "lora" and resume_from is not None:
        load_lora_state_dict(loaded.model, load_lora_dir(resume_from)[0], strict=True)
    loaded.vae.requires_grad_(False)
    trainable = select_trainable(loaded.model, lora=mode == "lora")
    data = prepare_training_data(cfg, loaded, progress=reporter.encoding, skip_bad=skip_bad)
    for warning in data.warnings:
        reporter.message(warning)
    return Session(cfg, mode, lora, model_dir, loaded, data, trainable, resume_from, resume_state)


# ---------------------------------------------------------------------------------------------- dry run


@dataclass
class DryRunReport:
    config_yaml: str
    mode: str
    lora: LoRAConfig | None
    model_dir: Path
    stats: DataStats
    dropped: list[DroppedSample]
    trainable_params: int
    total_params: int  # without the VAE
    num_iters: int
    epochs: float  # epochs that num_iters steps take
    resume_from: Path | None
    resume_step: int


def dry_run(cfg: TrainConfig, mode: str, reporter: Reporter | None = None, skip_bad: bool = False) -> DryRunReport:
    """Build everything a run needs (filling the latent cache), report it, train nothing."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the VAE encodes faster there
    s = build_session(cfg, mode, reporter or Reporter(), skip_bad, Dist(device=device))
    return DryRunReport(
        config_yaml=cfg.to_yaml(),
        mode=mode,
        lora=s.lora,
        model_dir=s.model_dir,
        stats=s.data.stats,
        dropped=s.data.dropped,
        trainable_params=sum(p.numel() for _, p in s.trainable),
        total_params=sum(p.numel() for p in s.loaded.model.parameters()),
        num_iters=cfg.num_iters,
        epochs=cfg.num_iters / max(s.data.stats.steps_per_epoch, 1e-9),
        resume_from=s.resume_from,
        resume_step=s.resume_state["step"] if s.resume_state else 0,
    )


# ---------------------------------------------------------------------------------------------- loss pieces


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
    """[B, 3] per sample: (loss/diff x patches, loss/stop x patches, audio patches), float32.

    Sums of these rows over micro-batches and ranks, divided by the patch total, give the step's
    mean losses over every audio patch, however the patches were split.
    """
    patches = batch.loss_mask.sum(1).float()  # [B]
    diff, stop = out["loss/diff_per_sample"].float(), out["loss/stop_per_sample"].float()
    return torch.stack([diff * patches, stop * patches, patches], 1)


def weighted_loss_sum(rows: torch.Tensor, lambdas: LossWeights) -> torch.Tensor:
    """lambdas-weighted loss summed over the rows of ``patch_sums`` (divide by the step's patch total)."""
    return lambdas.diff * rows[:, 0].sum() + lambdas.stop * rows[:, 1].sum()


# ---------------------------------------------------------------------------------------------- stop requests


class StopRequest:
    """SIGINT / SIGTERM set a flag the loop checks after each step (then it saves and exits).

    A second Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only in the main thread.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    save_path: Path
    start_step: int  # where this run started (non-zero when it resumed)
    step: int  # optimizer steps done (including skipped ones)
    checkpoint: Path | None  # the last checkpoint written
    signal: int | None  # the signal that stopped the run early, None when it finished
    nan_skipped: int
    is_main: bool  # rank 0 (the process that wrote files and should print)


def train(cfg: TrainConfig, mode: str, reporter: Reporter | None = None, skip_bad: bool = False) -> TrainResult:
    """Run (or resume) a fine-tuning run end to end; see the module docstring."""
    dist = Dist.from_env()
    if dist.device.type == "cpu":
        keep_freed_memory()  # steps reuse freed memory instead of faulting it in again
    reporter = reporter if reporter is not None and dist.is_main else Reporter()
    try:
        session = build_session(cfg, mode, reporter, skip_bad, dist)
        return _Loop(session, dist, reporter).run()
    finally:
        reporter.finish()
        dist.close()


class _Loop:
    def __init__(self, s: Session, dist: Dist, reporter: Reporter):
        self.s, self.cfg, self.dist, self.reporter = s, s.cfg, dist, reporter
        self.model = s.loaded.model.train()
        self.model.set_gradient_checkpointing(self.cfg.gradient_checkpointing)
        self.precision = resolve_precision(self.cfg.precision, dist.device)
        if self.precision.notice:
            reporter.message(self.precision.notice)
        self.bf16_weights = store_frozen_linears_in_bf16(self.model) if self.precision.bf16 and s.mode == "lora" else []
        self.ddp_model = self.model
        if dist.enabled:  # the buffers (RoPE tables, LoRA scaling) are equal on every rank: never sync them
            no_sync = {"forward_sync_buffers": False} if _DDP_HAS_FORWARD_SYNC else {"broadcast_buffers": False}
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids, **no_sync)
        self.params = [p for _, p in s.trainable]
        self.optimizer = build_optimizer(s.trainable, self.cfg.learning_rate, self.cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.warmup_steps, self.cfg.max_steps)
        self.loader = s.data.train_loader(dist.rank, dist.world_size, self.cfg.num_workers)
        self.dataset_index = {d: k for k, d in enumerate(sorted({x.dataset_id for x in s.data.train.samples}))}
        self.patch_seconds = s.loaded.config.patch_samples / s.loaded.config.sample_rate
        self.step, self.nan_skipped, self.bad_streak = 0, 0, 0
        self.last_checkpoint: Path | None = s.resume_from
        if s.resume_from is not None:
            self._restore(s.resume_from, s.resume_state)
        self.start_step = self.step
        self.logger = TrainLogger(self.cfg.save_path, self.cfg.tensorboard, self.step) if dist.is_main else None

    def _restore(self, ckpt: Path, state: dict) -> None:
        load_optimizer_and_scheduler(ckpt, self.optimizer, self.scheduler)
        self.step, self.nan_skipped = state["step"], state.get("nan_skipped", 0)
        self.loader.load_state_dict(state["data"])
        rng = state.get("rng", [])
        if len(rng) == self.dist.world_size:
            restore_rng(rng[self.dist.rank])
        else:
            self.reporter.message(f"{ckpt}: saved by {len(rng)} process(es), resumed by {self.dist.world_size}; RNG reseeded")
        self.reporter.message(f"resuming from {ckpt} (step {self.step})")

    # -- one optimizer step ----------------------------------------------------------------------

    def _train_step(self) -> tuple[torch.Tensor, float]:
        """Forward/backward over grad_accum_steps micro-batches -> (global loss sums [1+datasets, 3], grad norm)."""
        cfg, dist, device = self.cfg, self.dist, self.dist.device
        with torch.random.fork_rng(devices=[]):  # a new DataLoader iterator draws a seed: keep it off the training RNG
            batches = [next(self.loader) for _ in range(cfg.grad_accum_steps)]
        total_patches = dist.sum(torch.tensor([float(sum(b.loss_mask.sum() for b in batches))], device=device))
        scale = dist.world_size / total_patches.clamp(min=1)  # DDP averages gradients over ranks
        sums = torch.zeros(1 + len(self.dataset_index), 3, device=device)
        for i, batch in enumerate(batches):
            draws = sample_draws(batch, self.model.config.dit_config.cfm_config, cfg.seed, self.step, device)
            batch = batch.to(device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not dist.enabled else self.ddp_model.no_sync()
            with sync:
                with self.precision.autocast(device):
                    out = self.ddp_model(batch, draws)
                rows = patch_sums(out, batch)
                (weighted_loss_sum(rows, cfg.lambdas) * scale).backward()
            rows = rows.detach()
            sums[0] += rows.sum(0)
            sums.index_add_(0, 1 + torch.tensor([self.dataset_index[int(d)] for d in batch.dataset_ids], device=device), rows)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        return dist.sum(sums), grad_norm

    def run(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            _write_text_atomic(Path(cfg.save_path) / CONFIG_COPY, cfg.to_yaml())
        self.reporter.start(self.step, cfg.num_iters)
        self._window_seconds, self._window_start = 0.0, time.perf_counter()
        with StopRequest() as stop:
            try:
                while self.step < cfg.num_iters:
                    metrics, sums = self._optimizer_step()
                    self.reporter.step(self.step, metrics)
                    if self.step % cfg.log_interval == 0 or self.step == cfg.num_iters:
                        self._log(metrics, sums)
                    if dist.any(stop.signum is not None):  # every rank stops at the same step
                        self._save()
                        return self._result(stop.signum or signal.SIGTERM)
                    if cfg.valid_interval and self.step % cfg.valid_interval == 0 and self.s.data.val:
                        self._validate()
                    due = self.step == cfg.num_iters or (cfg.save_interval and self.step % cfg.save_interval == 0)
                    if due and self.bad_streak == 0:  # never replace good checkpoints with ones from a NaN streak
                        self._save()
            finally:
                if self.logger:
                    self.logger.close()
        return self._result(None)

    def _optimizer_step(self) -> tuple[dict[str, float], torch.Tensor]:
        """One step: forward/backward, update (or skip), schedule -> (step metrics, loss sums)."""
        lambdas, lr = self.cfg.lambdas, self.optimizer.param_groups[0]["lr"]
        sums, grad_norm = self._train_step()
        patches = max(float(sums[0, 2]), 1)
        diff, stop = float(sums[0, 0]) / patches, float(sums[0, 1]) / patches
        total = lambdas.diff * diff + lambdas.stop * stop
        self._update(math.isfinite(total) and math.isfinite(grad_norm))
        self.step += 1
        self._window_seconds += float(sums[0, 2]) * self.patch_seconds
        return {"loss/diff": diff, "loss/stop": stop, "loss/total": total, "lr": lr, "grad_norm": grad_norm}, sums

    def _log(self, metrics: dict[str, float], sums: torch.Tensor) -> None:
        """metrics.jsonl + TensorBoard: the step's metrics, throughput since the last log, losses per dataset."""
        elapsed = time.perf_counter() - self._window_start
        metrics = dict(metrics, audio_seconds_per_second=self._window_seconds / max(elapsed, 1e-9), nan_skipped=self.nan_skipped)
        for dataset_id, k in self.dataset_index.items():
            n = max(float(sums[1 + k, 2]), 1)
            metrics[f"loss/diff/dataset_{dataset_id}"] = float(sums[1 + k, 0]) / n
            metrics[f"loss/stop/dataset_{dataset_id}"] = float(sums[1 + k, 1]) / n
        if self.logger:
            self.logger.log(self.step, metrics)
        self._window_seconds, self._window_start = 0.0, time.perf_counter()

    def _update(self, finite: bool) -> None:
        """AdamW step, or a skipped one when the loss or gradient is NaN/inf; the LR schedule always advances."""
        if finite:
            self.optimizer.step()
            self.bad_streak = 0
        else:
            self.nan_skipped += 1
            self.bad_streak += 1
            self.reporter.message(
                f"step {self.step + 1}: loss or gradient is NaN/inf, update skipped ({self.bad_streak} in a row)"
            )
        self.optimizer.zero_grad(set_to_none=True)  # freed grads let backward reuse activation memory: lower peak
        with _quiet_scheduler_order():
            self.scheduler.step()
        if self.bad_streak >= MAX_BAD_STEPS:
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
            raise VoxCPMError(
                f"training stopped at step {self.step + 1}: the loss was NaN/inf for {MAX_BAD_STEPS} steps in a row; "
                f"{kept}; lower learning_rate, keep max_grad_norm > 0, or check the data with `voxcpm data validate`"
            )

    def _result(self, signum: int | None) -> TrainResult:
        return TrainResult(
            Path(self.cfg.save_path), self.start_step, self.step, self.last_checkpoint, signum, self.nan_skipped, self.dist.is_main
        )

    # -- checkpoints and validation -------------------------------------------------------------

    def _write_weights(self, folder: Path) -> None:
        s = self.s
        if s.mode == "lora":
            base = self.cfg.hf_model_id if self.cfg.pretrained_path is None else s.model_dir
            write_lora_files(folder, lora_state_dict(self.model), s.lora, base)
        else:
            write_model_files(folder, self.model, s.loaded.vae, s.loaded.config_dict, s.model_dir, dtype=torch.float32)

    def _save(self) -> None:
        if self.last_checkpoint is not None and self.last_checkpoint.name == step_dir_name(self.step):
            return  # this step is saved already (e.g. resumed at the end)
        rng = self.dist.gather(capture_rng())
        if self.dist.is_main:
            state = {
                "mode": self.s.mode,
                "data": self.loader.state_dict(),
                "rng": rng,
                "nan_skipped": self.nan_skipped,
                "world_size": self.dist.world_size,
                "seed": self.cfg.seed,
            }
            self.last_checkpoint = save_checkpoint(
                self.cfg.save_path, self.step, self._write_weights, self.optimizer, self.scheduler, state, self.cfg.keep_last_n
            )
        else:
            self.last_checkpoint = Path(self.cfg.save_path) / step_dir_name(self.step)
        self.dist.barrier()

    @torch.no_grad()
    def _validate(self) -> None:
        """Rank 0: mean validation losses (fixed noise) and audio for the first validation texts."""
        if self.dist.is_main:
            model, device, cfg = self.model.eval(), self.dist.device, self.cfg
            try:
                sums = torch.zeros(3, device=device)
                for batch in self.s.data.val_batches():
                    draws = sample_draws(batch, model.config.dit_config.cfm_config, cfg.seed, VAL_DRAW_STEP, device)
                    batch = batch.to(device)
                    with self.precision.autocast(device):
                        out = model(batch, draws)
                    sums += patch_sums(out, batch).sum(0)
                n = max(float(sums[2]), 1)
                diff, stop = float(sums[0]) / n, float(sums[1]) / n
                self.logger.log(
                    self.step,
                    {"val/loss/diff": diff, "val/loss/stop": stop, "val/loss/total": cfg.lambdas.diff * diff + cfg.lambdas.stop * stop},
                )
                with in_float32(self.bf16_weights):  # generation runs one dtype, outside autocast
                    self._write_samples()
                self.reporter.message(f"step {self.step}: validation loss/diff {diff:.4f}, loss/stop {stop:.4f}")
            finally:
                model.train()
        self.dist.barrier()

    def _write_samples(self) -> None:
        loaded, cfg = self.s.loaded, self.cfg
        folder = Path(cfg.save_path) / "samples" / step_dir_name(self.step)
        opts = SamplingOptions(retry_badcase=False)
        for i, sample in enumerate(self.s.data.val.samples[:VAL_SAMPLES]):
            gen = generate(self.model, loaded.vae, loaded.tokenizer, sample.text, opts=opts, seed=cfg.seed)
            write_wav(folder / f"val_{i}.wav", gen.wav, gen.sample_rate)
            self.logger.log_audio(self.step, f"samples/val_{i}", gen.wav, gen.sample_rate)


@contextlib.contextmanager
def _quiet_scheduler_order():
    """A skipped (NaN) first step calls scheduler.step() before optimizer.step(); that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        yield


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
