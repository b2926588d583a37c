"""Training checkpoints on disk (architecture page, section 8) and the resume point.

    <save_path>/step_0002000/   full: a complete model directory (config.json, model.safetensors,
                                audiovae.pth, tokenizer files); LoRA: lora_weights.safetensors +
                                lora_config.json; both: optimizer.pth, scheduler.pth,
                                training_state.json (step, RNG states per rank, data position)
    <save_path>/latest          text file naming the newest complete step directory

A checkpoint is written into a hidden temporary folder and renamed into place only when every
file is there, so a crash never leaves a half-written ``step_*`` directory; ``latest`` is replaced
atomically after the rename, then ``keep_last_n`` prunes the oldest ones.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.atomic import atomic_dir, atomic_write_text

LATEST_FILE = "latest"
TRAINING_STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.pth"
SCHEDULER_FILE = "scheduler.pth"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    save_path: Path,
    step: int,
    write_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    training_state: dict,
    keep_last_n: int | None = None,
) -> Path:
    """Write ``<save_path>/step_NNNNNNN`` atomically, point ``latest`` at it, prune old ones.

    ``write_weights(dir)`` writes the model part (a model directory or the LoRA files) into ``dir``.
    Leftovers of a save that was killed outright (hidden temporary folders) are removed first.
    """
    save_path = Path(save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    for stale in [*save_path.glob(".step_*.tmp-*"), *save_path.glob(".step_*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    final = save_path / step_dir_name(step)
    with atomic_dir(final, overwrite=True) as tmp:
        write_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        (tmp / TRAINING_STATE_FILE).write_text(json.dumps({"step": step, **training_state}), encoding="utf-8")
    atomic_write_text(save_path / LATEST_FILE, final.name + "\n")
    if keep_last_n:
        for old in complete_checkpoints(save_path)[:-keep_last_n]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(save_path: Path) -> list[Path]:
    """Complete ``step_*`` directories of ``save_path``, oldest first."""
    save_path = Path(save_path)
    if not save_path.is_dir():
        return []
    found = []
    for path in save_path.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / TRAINING_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest(save_path: Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names, else the newest complete one."""
    save_path = Path(save_path)
    latest = save_path / LATEST_FILE
    if latest.is_file():
        named = save_path / latest.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(named.name) and (named / TRAINING_STATE_FILE).is_file():
            return named
    complete = complete_checkpoints(save_path)
    return complete[-1] if complete else None


def read_training_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / TRAINING_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise VoxCPMError(f"{path}: unreadable training state ({exc}); delete {ckpt_dir} to resume from an older checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise VoxCPMError(f"{path}: no integer 'step'; delete {ckpt_dir} to resume from an older checkpoint")
    return state


def load_optimizer_and_scheduler(
    ckpt_dir: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> None:
    """Restore both state dicts from ``ckpt_dir`` (tensors land on the parameters' device)."""
    ckpt_dir = Path(ckpt_dir)
    for name, target in ((OPTIMIZER_FILE, optimizer), (SCHEDULER_FILE, scheduler)):
        path = ckpt_dir / name
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            target.load_state_dict(state)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise VoxCPMError(
                f"{path}: cannot restore ({exc}); was the checkpoint written by a run with another "
                f"training mode or other trainable parameters? Use a new save_path to start over"
            ) from None


def capture_rng() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states as JSON-friendly values."""
    np_state = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
