"""Option types shared by several commands, and what the shared ones resolve to."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from voxcpm_core.errors import VoxCPMError

if TYPE_CHECKING:
    from voxcpm_core.models.lora import LoRAConfig


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


Device = Annotated[DeviceChoice, typer.Option(help="Where to run: auto is cuda when available, else cpu (mps only when named).")]
Dtype = Annotated[
    DtypeChoice,
    typer.Option(
        help="Weights dtype: auto is the faster one here (CPU: bfloat16 with native bf16 instructions, else "
        "float32; GPU: the config's dtype). The VAE stays float32."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set lora.r=16 (repeatable).", metavar="KEY=VALUE"),
]


def training_lora_settings(config_path: Path) -> tuple[LoRAConfig, Path | str | None]:
    """(the ``lora:`` section, the base model: ``pretrained_path`` or ``hf_model_id``) of the training YAML
    that ``--config`` gives to ``infer`` and ``lora``."""
    from voxcpm_core.training.config import load_train_config  # torch loads only when a command runs

    cfg = load_train_config(config_path)
    if cfg.lora is None:
        raise VoxCPMError(f"{config_path}: has no lora: section; pass the YAML the adapter was trained with")
    return cfg.lora, cfg.pretrained_path if cfg.pretrained_path is not None else cfg.hf_model_id
