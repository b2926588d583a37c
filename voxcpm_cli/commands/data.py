"""`voxcpm data ...`: dataset checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from voxcpm_cli.options import Json
from voxcpm_core.data.manifest import ERROR
from voxcpm_core.data.report import Spread, ValidationReport
from voxcpm_core.data.validate import default_workers, validate_manifest

app = typer.Typer(help="Check training data before you spend GPU hours on it.", no_args_is_help=True)

MAX_SHOWN = 50
PATH_RULES = {
    "manifest_dir": "manifest's folder",
    "cwd": "current directory",
    "absolute": "absolute",
    "not_found": "not found",
}


@app.command("validate")
def validate(
    manifest: Annotated[
        Path,
        typer.Argument(
            metavar="MANIFEST",
            help='JSONL manifest: one {"audio": ..., "text": ...} object per line.',
            show_default=False,
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", help="Model directory: check against its sample rate, patch size and tokenizer."
        ),
    ] = None,
    sample_rate: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Model sample rate, when you have no model dir (16000: VoxCPM-0.5B, 44100: VoxCPM1.5).",
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(
            min=1, help="Count samples longer than this many tokens (training drops them). Needs --model."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --max-batch-tokens: also count samples over max_batch_tokens / batch_size."
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="A sample rate other than the model's is an error.")
    ] = False,
    deep: Annotated[
        bool, typer.Option("--deep", help="Decode every file: NaN/inf, clipping, silence.")
    ] = False,
    json_output: Json = False,
    workers: Annotated[int, typer.Option(min=1, help="Threads reading audio headers.")] = default_workers(),
) -> None:
    """Check a training manifest: JSON, fields, audio files, sample rates, durations, duplicates.

    Exit code 0 when no line has errors, 1 otherwise (warnings alone pass).
    """
    if model is not None and sample_rate is not None:
        raise typer.BadParameter("give one of them, not both", param_hint="'--model' / '--sample-rate'")
    if max_batch_tokens is not None and model is None:
        raise typer.BadParameter(
            "needs --model (token counts need its tokenizer)", param_hint="'--max-batch-tokens'"
        )
    if batch_size is not None and max_batch_tokens is None:
        raise typer.BadParameter("only counts with --max-batch-tokens", param_hint="'--batch-size'")

    tokenizer = patch_samples = None
    if model is not None:
        # Imported here: checkpoint pulls in torch, which plain manifest checks do not need.
        from voxcpm_core.io.checkpoint import load_tokenizer, read_model_config

        config = read_model_config(model)
        sample_rate, patch_samples = config.sample_rate, config.patch_samples
        tokenizer = load_tokenizer(model)

    report = validate_manifest(
        manifest,
        sample_rate=sample_rate,
        tokenizer=tokenizer,
        patch_samples=patch_samples,
        max_batch_tokens=max_batch_tokens,
        batch_size=batch_size,
        strict=strict,
        deep=deep,
        workers=workers,
    )
    if json_output:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        _print_report(report, Console(highlight=False))
    raise typer.Exit(0 if report.ok else 1)


def _seconds(value: float) -> str:
    return f"{value:.2f} s"


def _spread(spread: Spread | None, fmt=_seconds) -> str:
    if spread is None:
        return "-"
    keys = [k for k in ("min", "median", "p95", "max") if getattr(spread, k) is not None]
    return " / ".join(fmt(getattr(spread, k)) for k in keys) + f"  ({'/'.join(keys)})"


def _counts(counts: dict, names: dict | None = None) -> str:
    return ", ".join(f"{(names or {}).get(k, k)}: {v}" for k, v in counts.items()) or "-"


def _summary_table(report: ValidationReport) -> Table:
    stats = report.stats
    lines = stats.lines
    table = Table(title=f"[bold]{escape(str(report.manifest))}[/]", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("lines", str(lines.total))
    table.add_row("  ok", f"[green]{lines.ok}[/]")
    table.add_row("  with warnings only", f"[yellow]{lines.with_warnings}[/]")
    table.add_row("  with errors", f"[red]{lines.with_errors}[/]" if lines.with_errors else "0")
    hours = stats.total_hours
    total = f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min"
    table.add_row("readable audio", f"{stats.readable_audio} samples, {total}")
    table.add_row("duration", _spread(stats.duration_s))
    table.add_row("text characters", _spread(stats.text_chars, fmt=lambda v: f"{v:.0f}"))
    table.add_row("sample rates (Hz)", _counts(stats.sample_rates))
    table.add_row("channels", _counts(stats.channels))
    table.add_row("formats", _counts(stats.formats))
    table.add_row("audio paths found via", _counts(stats.path_rules, PATH_RULES))
    table.add_row("dataset_id", _counts(stats.dataset_ids))
    options = stats.options
    if options.sample_rate:
        table.add_row(
            "model sample rate", f"{options.sample_rate} Hz" + (" (--strict)" if options.strict else "")
        )
    seq = stats.sequence
    if seq:
        table.add_row("sequence tokens", _spread(seq.tokens, fmt=lambda v: f"{v:.0f}"))
        if seq.max_batch_tokens:
            table.add_row(
                "  over max_batch_tokens",
                f"{seq.over_max_batch_tokens} (> {seq.max_batch_tokens}: dropped)",
            )
        if seq.per_sample_budget:
            table.add_row(
                "  over max_batch_tokens / batch_size",
                f"{seq.over_per_sample_budget} (> {seq.per_sample_budget}: can't share a full batch)",
            )
    if len(report.issues) > MAX_SHOWN:
        table.add_row("problems by kind", _counts(stats.issue_counts))
    return table


def _problems_table(report: ValidationReport) -> Table:
    # Errors get the places first so a flood of warnings never hides them; shown in line order.
    shown = sorted(report.issues, key=lambda i: (i.severity != ERROR, i.line or 0))[:MAX_SHOWN]
    issues = sorted(shown, key=lambda i: i.line or 0)
    table = Table(title="[bold]problems[/]", title_justify="left")
    table.add_column("line", justify="right")
    table.add_column("level")
    table.add_column("code")
    table.add_column("message", overflow="fold")
    for issue in issues:
        level = "[red]error[/]" if issue.severity == ERROR else "[yellow]warning[/]"
        table.add_row(str(issue.line or "-"), level, issue.code, escape(issue.message))
    return table


def _print_report(report: ValidationReport, console: Console) -> None:
    console.print(_summary_table(report))
    if report.issues:
        console.print(_problems_table(report))
        hidden = len(report.issues) - MAX_SHOWN
        if hidden > 0:
            console.print(f"... and {hidden} more problems (--json lists them all)")
    lines = report.stats.lines
    if report.ok:
        note = f", {lines.with_warnings} with warnings" if lines.with_warnings else ""
        console.print(f"[bold green]OK[/]: {lines.total} lines, no errors{note}")
    elif lines.with_errors:
        console.print(
            f"[bold red]FAILED[/]: {lines.with_errors} of {lines.total} lines have errors; fix or drop them"
        )
    else:
        console.print(f"[bold red]FAILED[/]: {escape(report.errors[0].message)}")
