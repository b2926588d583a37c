"""The shipped shell completion scripts: up to date with the app, and they really complete."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest
from conftest import REPO
from typer.testing import CliRunner

from voxcpm_cli.main import app

_spec = importlib.util.spec_from_file_location("generate_completions", REPO / "completions" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_fresh(shell):
    path = REPO / "completions" / generate.FILES[shell]
    assert path.is_file(), f"{path} missing: run python completions/generate.py"
    assert path.read_text(encoding="utf-8") == generate.render(shell), (
        "stale: run python completions/generate.py"
    )
    assert "_VOXCPM_COMPLETE" in path.read_text(encoding="utf-8")


def test_app_answers_completion_requests():
    runner = CliRunner()

    def complete(words: str, cword: int) -> list[str]:
        env = {"_VOXCPM_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return runner.invoke(app, [], prog_name="voxcpm", env=env).output.split()

    assert "data" in complete("voxcpm da", 1)
    assert complete("voxcpm data va", 2) == ["validate"]
    assert complete("voxcpm data validate --st", 3) == ["--strict"]


@pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("voxcpm")), reason="needs bash and an installed voxcpm"
)
def test_bash_script_completes_through_the_installed_command():
    script = REPO / "completions" / generate.FILES["bash"]
    probe = f'source "{script}"; COMP_WORDS=(voxcpm data validate --de); COMP_CWORD=3; _voxcpm_completion voxcpm; echo "${{COMPREPLY[@]}}"'
    proc = subprocess.run(
        ["bash", "--norc", "-c", probe], capture_output=True, text=True, env=os.environ | {"COLUMNS": "80"}
    )
    assert proc.stdout.split() == ["--deep"], proc.stderr
