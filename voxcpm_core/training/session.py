"""What a training run builds before its first step (shared by the loop and ``--dry-run``).

    checks  the mode against the config's lora: section, the model directory, the resume point's mode
    model   seeded per rank, LoRA applied before the weights load, the resume checkpoint's weights
    data    manifests checked, latent cache filled, batches planned (``data.pipeline``)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxcpm_core.data.pipeline import PreparedData, prepare_training_data
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.checkpoint import LoadedModel, load_lora_dir, load_model_dir
from voxcpm_core.io.hub import resolve_model_dir
from voxcpm_core.io.run_dir import find_latest, read_training_state
from voxcpm_core.models.lora import LORA_GROUPS, LoRAConfig, load_lora_state_dict
from voxcpm_core.training.config import TrainConfig, data_spec
from voxcpm_core.training.distributed import Dist
from voxcpm_core.training.optim import select_trainable

MODES = ("full", "lora")
DEFAULT_LORA = LoRAConfig(enable_lm=True, enable_dit=True)  # `train lora` without a lora: section


class Reporter:
    """Where the loop reports progress; the CLI passes a rich implementation. All methods are optional."""

    def encoding(self, done: int, total: int) -> None:
        """VAE encoding of clips missing from the latent cache."""

    def start(self, step: int, total: int) -> None:
        """The loop starts at ``step`` (non-zero on resume) of ``total``."""

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """After every optimizer step (``step`` counts finished steps)."""

    def message(self, text: str) -> None:
        """A notice or warning for the user."""

    def finish(self) -> None:
        """The loop is over (finished, interrupted or failed)."""


def lora_for_mode(cfg: TrainConfig, mode: str) -> LoRAConfig | None:
    """The adapter to train: none for ``full`` (a lora: section is then an error), the YAML's or the defaults for ``lora``."""
    if mode not in MODES:
        raise VoxCPMError(f"unknown training mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "full":
        if cfg.lora is not None:
            raise VoxCPMError(
                f"{cfg.source}: has a 'lora:' section but mode 'full' trains every weight; train it with "
                "mode 'lora', or delete the lora: section for full fine-tuning",
                param="mode",
                value="lora",
            )
        return None
    lora = cfg.lora or DEFAULT_LORA
    if not lora.targets():
        flags = [group.enable for group in LORA_GROUPS]
        raise VoxCPMError(
            f"{cfg.source}: lora: {', '.join(flags)} are all false, so nothing would train; "
            f"set {' and/or '.join(f'lora.{flag}: true' for flag in flags)}"
        )
    return lora


@dataclass
class Session:
    """Everything built before the first step; shared by the loop and ``--dry-run``."""

    cfg: TrainConfig
    mode: str
    lora: LoRAConfig | None
    model_dir: Path  # the pretrained model directory
    loaded: LoadedModel  # the model to train (weights from the resume checkpoint if any)
    data: PreparedData
    trainable: list[tuple[str, nn.Parameter]]
    resume_from: Path | None
    resume_state: dict | None


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_session(cfg: TrainConfig, mode: str, reporter: Reporter, skip_bad: bool, dist: Dist) -> Session:
    lora = lora_for_mode(cfg, mode)
    if mode == "lora" and cfg.lora is None:
        reporter.message("no lora: section in the config; using LoRA defaults (LM + DiT, q/k/v/o_proj, r 8, alpha 16)")
    if cfg.pretrained_path is not None and not cfg.pretrained_path.is_dir():
        raise VoxCPMError(
            f"{cfg.source}: pretrained_path: {cfg.pretrained_path} is not a directory; point it at a model "
            "directory (config.json, model.safetensors, audiovae.pth, tokenizer files)"
        )
    model_dir = resolve_model_dir(cfg.pretrained_path or cfg.hf_model_id)
    resume_from = find_latest(cfg.save_path)
    resume_state = read_training_state(resume_from) if resume_from else None
    if resume_state is not None and resume_state.get("mode", mode) != mode:
        raise VoxCPMError(
            f"{resume_from}: written by `voxcpm train {resume_state['mode']}`; resume it with that command, "
            f"or set another save_path to start a {mode} run"
        )
    _seed_everything(cfg.seed + dist.rank)  # before LoRA init: rank 0 starts from what one process would
    if mode == "full" and resume_from is not None:
        loaded = load_model_dir(resume_from, device=dist.device, dtype=torch.float32)
    else:
        loaded = load_model_dir(model_dir, lora=lora, device=dist.device, dtype=torch.float32)
    if mode == "lora" and resume_from is not None:
        load_lora_state_dict(loaded.model, load_lora_dir(resume_from)[0], strict=True)
    loaded.vae.requires_grad_(False)
    trainable = select_trainable(loaded.model, lora=mode == "lora")
    data = prepare_training_data(data_spec(cfg, loaded.config), loaded, progress=reporter.encoding, skip_bad=skip_bad)
    for warning in data.warnings:
        reporter.message(warning)
    return Session(cfg, mode, lora, model_dir, loaded, data, trainable, resume_from, resume_state)
