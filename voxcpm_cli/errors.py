"""Turn the engine's expected errors into one red line and an exit code."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.markup import escape

from voxcpm_core.errors import VoxCPMError

T = TypeVar("T")
err_console = Console(stderr=True, highlight=False)
_state = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    _state["verbose"] = verbose


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The engine's warnings (``warnings.warn``) as one yellow line, without Python's source-line echo."""
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)


@contextmanager
def flag_hints(**flags: str) -> Iterator[None]:
    """Say an engine error's fix in this command's options: the error names the API parameter that fixes it
    (``VoxCPMError.param``, e.g. ``device``), ``flags`` the option that sets it (``device="--device"``), and
    the message gets "(--device cpu)" appended. The message changes in place, so tests see it too."""
    try:
        yield
    except VoxCPMError as exc:
        flag = flags.get(exc.param or "")
        if flag is not None:
            exc.args = (f"{exc.args[0]} ({flag if exc.value is None else f'{flag} {exc.value}'})",)
        raise


def run_app(app: Callable[..., T]) -> None:
    """Call the Typer app; a ``VoxCPMError`` prints as one line (a traceback with --verbose), a warning too.

    Usage errors keep click's handling (message and exit code 2).
    """
    warnings.showwarning = _show_warning
    try:
        app()
    except VoxCPMError as exc:
        if _state["verbose"]:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)  # one line, even when piped
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
