"""The fine-tuning recipe behind `voxcpm train full` and `voxcpm train lora`: one explicit loop.

    setup  model (LoRA applied before the weights load) -> resume point -> data         (session.py)
    step   grad_accum_steps micro-batches -> token-weighted loss -> backward (DDP syncs on the last)
           -> clip -> AdamW (skipped when the loss is NaN/inf) -> LR schedule   (step.py, losses.py)
    then   log every log_interval, validate every valid_interval, save every save_interval and at the end

The loss of a step is the lambdas-weighted mean over every audio patch of the step, across
micro-batches and ranks, so N ranks with grad_accum_steps 1 train exactly like one process with
grad_accum_steps N. The flow-matching noise of a sample is seeded by (seed, step, the sample's
content), never by the batch it lands in: a resumed run and a DDP run draw what an uninterrupted
single-process run draws. Under torchrun, ranks shard the batches and only rank 0 writes files.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from voxcpm_core.data.audio import write_wav
from voxcpm_core.data.pipeline import DataStats, DroppedSample
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.generation.sampling import SamplingOptions, generate
from voxcpm_core.io.atomic import atomic_write_text
from voxcpm_core.io.checkpoint import resolve_device, write_lora_files, write_model_files
from voxcpm_core.io.run_dir import (
    capture_rng,
    load_optimizer_and_scheduler,
    restore_rng,
    save_checkpoint,
    step_dir_name,
)
from voxcpm_core.models.lora import LoRAConfig, lora_state_dict
from voxcpm_core.training.config import TrainConfig
from voxcpm_core.training.distributed import Dist
from voxcpm_core.training.losses import loss_metrics, mean_losses
from voxcpm_core.training.metrics import TrainLogger
from voxcpm_core.training.precision import in_float32
from voxcpm_core.training.session import Reporter, Session, build_session
from voxcpm_core.training.step import StepResult, TrainStep

MAX_BAD_STEPS = 10  # NaN/inf steps in a row before training stops
VAL_SAMPLES = 2  # validation texts spoken at every validation
VAL_DRAW_STEP = -1  # validation uses the same noise every time, so its losses compare across steps
CONFIG_COPY = "train_config.yaml"


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
    device = resolve_device("auto")  # CUDA when there is one: the VAE encodes faster there
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
        self.model = s.loaded.model
        dataset_ids = {x.dataset_id for x in s.data.train.samples}
        self.train_step = TrainStep(self.model, s.trainable, self.cfg, s.mode == "lora", dist, dataset_ids)
        if self.train_step.precision.notice:
            reporter.message(self.train_step.precision.notice)
        self.loader = s.data.train_loader(dist.rank, dist.world_size, self.cfg.num_workers)
        self.patch_seconds = s.loaded.config.patch_samples / s.loaded.config.sample_rate
        self.step, self.nan_skipped, self.bad_streak = 0, 0, 0
        self.last_checkpoint: Path | None = s.resume_from
        if s.resume_from is not None:
            self._restore(s.resume_from, s.resume_state)
        self.start_step = self.step
        self.logger = TrainLogger(self.cfg.save_path, self.cfg.tensorboard, self.step) if dist.is_main else None

    def _restore(self, ckpt: Path, state: dict) -> None:
        load_optimizer_and_scheduler(ckpt, self.train_step.optimizer, self.train_step.scheduler)
        self.step, self.nan_skipped = state["step"], state.get("nan_skipped", 0)
        self.loader.load_state_dict(state["data"])
        rng = state.get("rng", [])
        if len(rng) == self.dist.world_size:
            restore_rng(rng[self.dist.rank])
        else:
            self.reporter.message(f"{ckpt}: saved by {len(rng)} process(es), resumed by {self.dist.world_size}; RNG reseeded")
        self.reporter.message(f"resuming from {ckpt} (step {self.step})")

    def run(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            atomic_write_text(Path(cfg.save_path) / CONFIG_COPY, cfg.to_yaml())
        self.reporter.start(self.step, cfg.num_iters)
        self._window_seconds, self._window_start = 0.0, time.perf_counter()
        with self.train_step.keeping_freed_memory(), StopRequest() as stop:
            try:
                while self.step < cfg.num_iters:
                    result = self._optimizer_step()
                    self.reporter.step(self.step, result.metrics)
                    if self.step % cfg.log_interval == 0 or self.step == cfg.num_iters:
                        self._log(result)
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

    def _optimizer_step(self) -> StepResult:
        """One step over the next grad_accum_steps micro-batches; NaN/inf steps are counted, MAX_BAD_STEPS in a row stop."""
        with torch.random.fork_rng(devices=[]):  # a new DataLoader iterator draws a seed: keep it off the training RNG
            batches = [next(self.loader) for _ in range(self.cfg.grad_accum_steps)]
        result = self.train_step(batches, self.step)
        if result.updated:
            self.bad_streak = 0
        else:
            self.nan_skipped += 1
            self.bad_streak += 1
            self.reporter.message(
                f"step {self.step + 1}: loss or gradient is NaN/inf, update skipped ({self.bad_streak} in a row)"
            )
            if self.bad_streak >= MAX_BAD_STEPS:
                kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
                raise VoxCPMError(
                    f"training stopped at step {self.step + 1}: the loss was NaN/inf for {MAX_BAD_STEPS} steps in a row; "
                    f"{kept}; lower learning_rate, keep max_grad_norm > 0, or check the data with `voxcpm data validate`"
                )
        self.step += 1
        self._window_seconds += float(result.sums[0, 2]) * self.patch_seconds
        return result

    def _log(self, result: StepResult) -> None:
        """metrics.jsonl + TensorBoard: the step's metrics, throughput since the last log, losses per dataset."""
        elapsed = time.perf_counter() - self._window_start
        metrics = dict(result.metrics, audio_seconds_per_second=self._window_seconds / max(elapsed, 1e-9), nan_skipped=self.nan_skipped)
        for dataset_id, k in self.train_step.dataset_index.items():
            diff, stop = mean_losses(result.sums[1 + k])
            metrics[f"loss/diff/dataset_{dataset_id}"] = diff
            metrics[f"loss/stop/dataset_{dataset_id}"] = stop
        if self.logger:
            self.logger.log(self.step, metrics)
        self._window_seconds, self._window_start = 0.0, time.perf_counter()

    def _result(self, signum: int | None) -> TrainResult:
        return TrainResult(
            Path(self.cfg.save_path), self.start_step, self.step, self.last_checkpoint, signum, self.nan_skipped, self.dist.is_main
        )

    # -- checkpoints and validation -------------------------------------------------------------

    def _write_weights(self, folder: Path) -> None:
        s = self.s
        if s.mode == "lora":
            # distribute: the adapter names the published base, so it loads wherever that id resolves
            base = self.cfg.hf_model_id if self.cfg.distribute or self.cfg.pretrained_path is None else s.model_dir
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
            optimizer, scheduler = self.train_step.optimizer, self.train_step.scheduler
            self.last_checkpoint = save_checkpoint(
                self.cfg.save_path, self.step, self._write_weights, optimizer, scheduler, state, self.cfg.keep_last_n
            )
        else:
            self.last_checkpoint = Path(self.cfg.save_path) / step_dir_name(self.step)
        self.dist.barrier()

    def _validate(self) -> None:
        """Rank 0: mean validation losses (fixed noise) and audio for the first validation texts."""
        if self.dist.is_main:
            self.model.eval()  # no LoRA dropout, in the losses and in generation
            try:
                sums = self.train_step.evaluate(self.s.data.val_batches(), VAL_DRAW_STEP)
                metrics = loss_metrics(sums, self.cfg.lambdas, prefix="val/")
                self.logger.log(self.step, metrics)
                with in_float32(self.train_step.bf16_weights):  # generation runs one dtype, outside autocast
                    self._write_samples()
                diff, stop = metrics["val/loss/diff"], metrics["val/loss/stop"]
                self.reporter.message(f"step {self.step}: validation loss/diff {diff:.4f}, loss/stop {stop:.4f}")
            finally:
                self.model.train()
        self.dist.barrier()

    @torch.no_grad()
    def _write_samples(self) -> None:
        loaded, cfg = self.s.loaded, self.cfg
        folder = Path(cfg.save_path) / "samples" / step_dir_name(self.step)
        opts = SamplingOptions(retry_badcase=False)
        for i, sample in enumerate(self.s.data.val.samples[:VAL_SAMPLES]):
            gen = generate(self.model, loaded.vae, loaded.tokenizer, sample.text, opts=opts, seed=cfg.seed)
            write_wav(folder / f"val_{i}.wav", gen.wav, gen.sample_rate)
            self.logger.log_audio(self.step, f"samples/val_{i}", gen.wav, gen.sample_rate)
