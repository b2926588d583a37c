"""Regenerate the shell completion scripts in this folder: `python completions/generate.py`.

The scripts are the ones `voxcpm --show-completion` prints (Typer's templates for prog name
`voxcpm`, complete variable `_VOXCPM_COMPLETE`); at Tab they call `voxcpm` back for the candidates,
so they change only when Typer's templates do. tests/test_completions.py fails when they are stale.
"""

from __future__ import annotations

from pathlib import Path

from typer.completion import get_completion_script

PROG_NAME = "voxcpm"
COMPLETE_VAR = "_VOXCPM_COMPLETE"
FOLDER = Path(__file__).resolve().parent
FILES = {"bash": "voxcpm.bash", "zsh": "_voxcpm", "fish": "voxcpm.fish"}


def render(shell: str) -> str:
    return get_completion_script(prog_name=PROG_NAME, complete_var=COMPLETE_VAR, shell=shell) + "\n"


def main() -> None:
    for shell, name in FILES.items():
        (FOLDER / name).write_text(render(shell), encoding="utf-8")
        print(f"wrote {FOLDER / name}")


if __name__ == "__main__":
    main()
