"""Turn the engine's expected errors into one red line and an exit code."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
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
