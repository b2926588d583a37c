"""Shared test fixtures: the official reference fixtures live in ../shared/fixtures beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
OFFICIAL = FIXTURES / "official"
PRESETS = ("v1-tiny", "v15-tiny")

if "OMP_NUM_THREADS" not in os.environ:  # engineers sharing the cores run tests with OMP_NUM_THREADS=1
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def official_dir(preset: str) -> Path:
    """The official fixture folder; CI must have it, a user's clone may skip."""
    path = OFFICIAL / preset
    if not path.is_dir():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path} is missing: CI needs ../shared/fixtures beside the repo")
        pytest.skip(f"{path} not present (official fixtures are only beside the dev checkout)")
    return path


@pytest.fixture(params=PRESETS)
def preset_dir(request) -> Path:
    """Each official preset folder in turn (base/, lora/, reference.*)."""
    return official_dir(request.param)
