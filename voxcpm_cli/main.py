"""The `voxcpm` app: wires the command groups together."""

from __future__ import annotations

from typing import Annotated

import typer

from voxcpm_cli.commands import data, infer, lora, train
from voxcpm_cli.errors import run_app, set_verbose
from voxcpm_core import __version__

app = typer.Typer(
    name="voxcpm",
    help="Fine-tune VoxCPM text-to-speech models and run them: data checks, full/LoRA training, inference.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data")
app.command("infer")(infer.infer)
app.add_typer(train.app, name="train")
app.add_typer(lora.app, name="lora")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"voxcpm-tune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    set_verbose(verbose)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
