"""`voxcpm data ...`: dataset checks."""

import typer

app = typer.Typer(help="Check training data before you spend GPU hours on it.", no_args_is_help=True)
