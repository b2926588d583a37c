"""Where a model named by the user lives: a local model directory, or a Hugging Face Hub id downloaded once.

Below the API and the adapter tools, which both resolve names ("openbmb/VoxCPM1.5", "models/base") here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from voxcpm_core.errors import VoxCPMError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "openbmb/VoxCPM1.5"


def is_hub_id(name: str | os.PathLike) -> bool:
    return HUB_ID.fullmatch(str(name)) is not None


def resolve_model_dir(name: str | os.PathLike) -> Path:
    """A local model directory, or a Hugging Face Hub id ("openbmb/VoxCPM1.5") downloaded to the hub cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not is_hub_id(name):
        raise VoxCPMError(f"{path}: model directory not found; give a folder with config.json and the weights")
    try:
        from huggingface_hub import snapshot_download  # an optional extra: imported only for a Hub id
    except ImportError:
        raise VoxCPMError(
            f"{name}: no such local directory; to download it as a Hugging Face Hub id install the hub extra: "
            "pip install 'voxcpm-tune[hub]'"
        ) from None
    try:
        return Path(snapshot_download(repo_id=str(name)))
    except Exception as exc:  # offline, unknown repo, HTTP errors: all mean "not available"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise VoxCPMError(
            f"{name}: no such local directory, and downloading it from the Hugging Face Hub failed ({reason}); "
            "check the id and the network, or pass a local model directory"
        ) from None
