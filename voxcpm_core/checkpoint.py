"""Everything that knows file names, key names and on-disk formats of model and LoRA directories."""

from __future__ import annotations

import json
from pathlib import Path

from voxcpm_core.config import VoxCPMConfig, parse_model_config
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.tokenizer import TextTokenizer

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise VoxCPMError(f"{path}: {what} not found (expected a directory)")
    return path


def read_config_dict(model_dir: Path) -> dict:
    """The raw ``config.json`` of a model directory (unknown keys kept, for saving back)."""
    path = _require_dir(model_dir, "model directory") / CONFIG_FILE
    if not path.is_file():
        raise VoxCPMError(f"{path}: missing; a model directory needs config.json, model weights and audiovae weights")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VoxCPMError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise VoxCPMError(f"{path}: expected a JSON object at the top level")
    return data


def read_model_config(model_dir: Path) -> VoxCPMConfig:
    """Parse and validate ``<model_dir>/config.json``."""
    return parse_model_config(read_config_dict(model_dir), source=str(Path(model_dir) / CONFIG_FILE))


def load_tokenizer(model_dir: Path) -> TextTokenizer:
    """The model's text tokenizer from ``tokenizer.json`` (+ ``tokenizer_config.json`` added tokens)."""
    model_dir = _require_dir(model_dir, "model directory")
    tokenizer_json = model_dir / TOKENIZER_FILES[0]
    if not tokenizer_json.is_file():
        raise VoxCPMError(f"{tokenizer_json}: missing; copy the tokenizer files from the released model")
    return TextTokenizer.from_files(tokenizer_json, model_dir / TOKENIZER_FILES[1])
