"""`voxcpm lora inspect|merge`: look inside a LoRA checkpoint folder, or fold it into a standalone model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from voxcpm_cli.errors import flag_hints
from voxcpm_cli.options import Json, training_lora_settings

if TYPE_CHECKING:
    from voxcpm_core.adapter_report import AdapterReport
    from voxcpm_core.models.lora import LoRAConfig

app = typer.Typer(help="Inspect LoRA adapters and merge them into standalone models.", no_args_is_help=True)
console = Console(highlight=False)
FLAGS = {"base": "--base", "lora_config": "--config TRAIN.yaml"}  # engine parameter -> option (error hints)

LoraDir = Annotated[
    Path,
    typer.Argument(
        metavar="DIR",
        help="LoRA checkpoint folder (lora_weights.safetensors, lora_config.json).",
        show_default=False,
    ),
]
Base = Annotated[
    str | None,
    typer.Option(
        "--base",
        metavar="MODEL_DIR",
        help="Base model directory (or Hub id); default: the adapter's base_model in lora_config.json.",
    ),
]
TrainingConfig = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Training YAML: its lora: section gives the structure (for adapters without lora_config.json), "
        "its pretrained_path the base.",
    ),
]


def _settings(config: Path | None, base: str | None) -> tuple[LoRAConfig | None, str | Path | None]:
    """The LoRA structure and base a --config YAML gives (an explicit --base wins)."""
    if config is None:
        return None, base
    lora_config, yaml_base = training_lora_settings(config)
    return lora_config, base if base is not None else yaml_base


@app.command("inspect")
def inspect(
    lora_dir: LoraDir, base: Base = None, config: TrainingConfig = None, json_output: Json = False
) -> None:
    """Show an adapter's rank, alpha, targets, sizes and (with a base) whether it fits that base.

    Exit code 0 when the adapter is usable (on the base, when one is known), 1 with the reasons otherwise.
    """
    from voxcpm_core.adapter_report import inspect_adapter  # torch loads only when a command runs

    with flag_hints(**FLAGS):
        lora_config, base = _settings(config, base)
        report = inspect_adapter(lora_dir, base, lora_config)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        _print_report(report)
    raise typer.Exit(0 if report.ok else 1)


@app.command("merge")
def merge(
    lora_dir: LoraDir,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", metavar="OUT_DIR", help="Model directory to write (must not exist)."),
    ],
    base: Base = None,
    config: TrainingConfig = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Fold the adapter into its base: a standalone model directory (W + alpha/r * B A, in the base's dtype)."""
    from voxcpm_core.adapters import AdapterMismatchError, merge_adapter

    with flag_hints(**FLAGS):
        lora_config, base = _settings(config, base)
        try:
            result = merge_adapter(lora_dir, base, output, lora_config, overwrite=overwrite)
        except AdapterMismatchError as exc:  # all the reasons are one command away
            exc.args = (f"{exc}; see voxcpm lora inspect {exc.lora_dir} --base {exc.base}",)
            raise
    cfg = result.config
    console.print(
        f"merged {result.layers} LoRA layers (r={cfg.r}, alpha={cfg.alpha}, scaling {cfg.scaling:g}) into "
        f"{escape(str(result.base_dir))}\nwrote {escape(str(result.out_dir))}: use it with "
        f"voxcpm infer --ckpt-dir {escape(str(result.out_dir))}"
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3g} %"


def _print_report(report: AdapterReport) -> None:
    summary = Table(
        title=f"[bold]LoRA adapter {escape(report.path)}[/]", show_header=False, title_justify="left"
    )
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    summary.add_row(
        "weights", f"{escape(Path(report.weights_file).name)}, {_size(report.file_size)}, {report.dtype}"
    )
    summary.add_row("config", escape(report.config_source or "none (structure read from the tensors)"))
    if report.rank is not None:
        summary.add_row(
            "rank / alpha",
            f"r {report.rank}, alpha {report.alpha:g} (scaling {report.scaling:g}), dropout {report.dropout:g}",
        )
    for group, modules in report.targets.items():
        summary.add_row(f"targets: {group}", ", ".join(modules))
    summary.add_row("base_model", escape(report.base_model or "-"))
    summary.add_row("checked on", escape(report.base_dir or "no base (compatibility not checked)"))
    summary.add_row(
        "size", f"{report.tensors} tensors, {report.parameters:,} parameters, {len(report.layers)} layers"
    )
    console.print(summary)

    if report.components:
        from voxcpm_core.models.lora import LORA_PARTS

        with_base = any(c.relative_update is not None for c in report.components)
        table = Table(title="[bold]update size per component[/]", title_justify="left")
        table.add_column("component", no_wrap=True)
        table.add_column("modules", overflow="fold")
        table.add_column("layers", justify="right", no_wrap=True)
        table.add_column("parameters", justify="right", no_wrap=True)
        table.add_column("‖ΔW‖/‖W‖" if with_base else "‖ΔW‖", justify="right", no_wrap=True)
        if with_base:
            table.add_column("largest layer", overflow="fold")
        for c in report.components:
            size = _percent(c.relative_update) if with_base else f"{c.update_norm:.4g}"
            part = LORA_PARTS[c.name]
            row = [part.label, ", ".join(c.modules), str(c.layers), f"{c.parameters:,}", size]
            if with_base:
                layer = c.max_layer.removeprefix(f"{part.prefix}.")
                row.append(f"{_percent(c.max_relative_update)} {escape(layer)}")
            table.add_row(*row)
        console.print(table)

    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for problem in report.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    if not report.ok:
        where = f" with {escape(report.base_dir)}" if report.base_dir else ""
        console.print(f"[bold red]NOT USABLE[/]{where}: {len(report.problems)} problem(s)")
    elif report.compatible:
        console.print(f"[bold green]OK[/]: compatible with {escape(report.base_dir)}")
    else:
        console.print("[bold green]OK[/]: consistent (pass --base to check it against a model)")
