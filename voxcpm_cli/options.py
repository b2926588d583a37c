"""Option types shared by several commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


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


CkptDir = Annotated[
    Path,
    typer.Option("--ckpt-dir", help="Model directory (config.json, model.safetensors, audiovae.pth, tokenizer)."),
]
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
