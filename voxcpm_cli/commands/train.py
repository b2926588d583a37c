"""`voxcpm train full|lora`: fine-tune a model from a YAML config (the fine-tuning guide's schema).

Running the same command again resumes from ``<save_path>/latest``. Multi-GPU (or several CPU
processes): ``torchrun --nproc_per_node=N -m voxcpm_cli train lora --config c.yaml``.
`train full` with a ``lora:`` section is an error (it would silently ignore the adapter settings);
`train lora` without one uses the LoRA defaults (LM + DiT attention projections, r 8, alpha 16).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from voxcpm_cli.errors import flag_hints
from voxcpm_cli.options import Overrides

if TYPE_CHECKING:
    from voxcpm_core.training.trainer import DryRunReport, TrainResult

app = typer.Typer(
    help="Fine-tune a model: [bold]full[/] (every weight but the VAE) or [bold]lora[/] (small adapters).",
    no_args_is_help=True,
)
console = Console(highlight=False)
FLAGS = {"overrides": "--set", "skip_bad": "--skip-bad", "mode": "voxcpm train"}  # engine parameter -> CLI (error hints)

ConfigPath = Annotated[
    Path, typer.Option("--config", "-c", help="Training YAML (the guide's schema), e.g. conf/demo/lora.yaml.")
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the resolved config, dataset statistics, samples over max_batch_tokens, steps per epoch "
        "and trainable parameters (the latent cache is filled), then exit without training.",
    ),
]
SkipBad = Annotated[
    bool, typer.Option("--skip-bad", help="Drop manifest samples that fail the checks (with a warning) instead of stopping.")
]


@app.command("full")
def full(config: ConfigPath, overrides: Overrides = None, dry_run: DryRun = False, skip_bad: SkipBad = False) -> None:
    """Full fine-tuning: every weight except the frozen audio VAE; checkpoints are complete model directories.

    Run the same command again to resume from <save_path>/latest.

    Several GPUs (or CPU processes): torchrun --nproc_per_node=N -m voxcpm_cli train full --config C
    """
    _train("full", config, overrides, dry_run, skip_bad)


@app.command("lora")
def lora(config: ConfigPath, overrides: Overrides = None, dry_run: DryRun = False, skip_bad: SkipBad = False) -> None:
    """LoRA fine-tuning: only the adapters of the config's lora: section train; checkpoints hold only them.

    Without a lora: section the defaults apply (LM + DiT q/k/v/o_proj, r 8, alpha 16). Run the same command again to resume from <save_path>/latest.

    Several GPUs (or CPU processes): torchrun --nproc_per_node=N -m voxcpm_cli train lora --config C
    """
    _train("lora", config, overrides, dry_run, skip_bad)


def _train(mode: str, config: Path, overrides: list[str] | None, dry_run: bool, skip_bad: bool) -> None:
    from voxcpm_core.training import trainer  # torch loads only when a command runs
    from voxcpm_core.training.config import load_train_config

    with flag_hints(**FLAGS):
        cfg = load_train_config(config, overrides)
        reporter = RichReporter(cfg.log_interval)
        if dry_run:
            try:
                report = trainer.dry_run(cfg, mode, reporter, skip_bad)
            finally:
                reporter.finish()
            _print_dry_run(report)
            return
        started = time.perf_counter()
        result = trainer.train(cfg, mode, reporter, skip_bad)
    if result.is_main:
        _print_result(result, cfg, time.perf_counter() - started)
    if result.signal is not None:
        raise typer.Exit(128 + result.signal)


class RichReporter:
    """The trainer's Reporter as rich progress bars (encoding, then training); plain lines when not a terminal."""

    def __init__(self, log_interval: int):
        self.log_interval = log_interval
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._encode_task = self._train_task = None
        self._t0, self._step0 = 0.0, 0

    def _ensure_started(self) -> None:
        if not self.progress.live.is_started and console.is_terminal:
            self.progress.start()

    def encoding(self, done: int, total: int) -> None:
        if total <= 0:
            return
        self._ensure_started()
        if self._encode_task is None:
            self._encode_task = self.progress.add_task("encoding audio (once)", total=total, stats="")
            self.message(f"encoding {total} clip(s) with the VAE into the latent cache (reused by later runs)")
        self.progress.update(self._encode_task, completed=done)

    def start(self, step: int, total: int) -> None:
        self._ensure_started()
        self._train_task = self.progress.add_task("training", total=total, completed=step, stats="")
        self._t0, self._step0 = time.perf_counter(), step

    def step(self, step: int, metrics: dict[str, float]) -> None:
        rate = (step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)
        stats = (
            f"loss/diff {metrics['loss/diff']:.4f}  loss/stop {metrics['loss/stop']:.4f}  "
            f"lr {metrics['lr']:.2e}  {rate:.2f} it/s"
        )
        self.progress.update(self._train_task, completed=step, stats=stats)
        if not console.is_terminal and (step % self.log_interval == 0 or step == self.progress.tasks[-1].total):
            console.print(f"step {step}/{int(self.progress.tasks[-1].total)}  {stats}", soft_wrap=True)

    def message(self, text: str) -> None:
        console.print(f"[yellow]{escape(text)}[/]", soft_wrap=True)

    def finish(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def _print_result(result: TrainResult, cfg, seconds: float) -> None:
    where = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint"
    skipped = f", {result.nan_skipped} NaN/inf step(s) skipped" if result.nan_skipped else ""
    if result.start_step >= cfg.num_iters:
        console.print(
            f"nothing to do: {result.save_path} already holds step {result.step} (num_iters {cfg.num_iters}); "
            "raise num_iters (e.g. --set num_iters=...) to train longer, or set a new save_path",
            soft_wrap=True,
        )
        return
    if result.signal is not None:
        name = signal.Signals(result.signal).name
        console.print(
            f"[yellow]stopped by {name} at step {result.step}[/]: {where}; run the same command to resume", soft_wrap=True
        )
        return
    console.print(f"[green]done[/]: step {result.step}/{cfg.num_iters} in {seconds:.0f} s, {where}{skipped}", soft_wrap=True)
    console.print(f"metrics: {result.save_path / 'metrics.jsonl'}", soft_wrap=True)
    if cfg.tensorboard is not None:
        console.print(f"tensorboard --logdir {cfg.tensorboard}", soft_wrap=True)


def _print_dry_run(r: DryRunReport) -> None:
    console.rule("resolved config")
    console.print(escape(r.config_yaml.rstrip()), soft_wrap=True)
    s = r.stats
    console.rule("data")
    table = Table(show_header=False, box=None)
    table.add_row("training clips", f"{s.clips} ({s.hours * 60:.1f} min)")
    for dataset_id, clips in s.per_dataset.items():
        table.add_row(f"  dataset {dataset_id}", f"{clips} clips ({s.per_dataset_hours[dataset_id] * 60:.1f} min)")
    table.add_row("validation clips", str(s.val_clips))
    table.add_row("dropped: bad samples (--skip-bad)", str(s.bad))
    table.add_row("dropped: over max_batch_tokens", str(s.over_budget))
    table.add_row("longest kept sample", f"{s.max_length} positions")
    table.add_row("batches per epoch (per process)", str(s.batches_per_epoch))
    table.add_row("optimizer steps per epoch", f"{s.steps_per_epoch:g}")
    table.add_row("padding", f"{s.padding:.1%}")
    table.add_row("clips encoded now", f"{s.encoded} (the rest came from the latent cache)")
    console.print(table)
    for d in r.dropped[:20]:
        console.print(f"  dropped {d.split} line {d.line} ({escape(d.audio)}): {escape(d.reason)}", soft_wrap=True)
    if len(r.dropped) > 20:
        console.print(f"  ... and {len(r.dropped) - 20} more")
    console.rule("training")
    plan = Table(show_header=False, box=None)
    plan.add_row("mode", r.mode + (f" ({_describe_lora(r.lora)})" if r.lora else ""))
    plan.add_row("model", str(r.model_dir))
    share = r.trainable_params / max(r.total_params, 1)
    plan.add_row("trainable parameters", f"{r.trainable_params:,} of {r.total_params:,} ({share:.2%}; VAE frozen)")
    plan.add_row("optimizer steps (num_iters)", f"{r.num_iters} ({r.epochs:.1f} epochs)")
    plan.add_row("resume from", f"{r.resume_from} (step {r.resume_step})" if r.resume_from else "nothing, a fresh run")
    console.print(plan)
    console.print("[green]dry run: nothing was trained[/]")


def _describe_lora(lora) -> str:
    targets = ", ".join(f"{group}: {'/'.join(leaves)}" for group, leaves in lora.targets().items())
    return f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}; {targets}"
