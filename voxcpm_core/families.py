"""Model families: ``config.json["architecture"]`` picks one entry here, once, and the entry names everything
that differs between families, so a family is one more entry, not branches across the code.

The architecture is read lower-cased, "voxcpm" when the key is absent (as the reference reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from voxcpm_core.config import parse_model2_config, parse_model_config
from voxcpm_core.data.collate import collate
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.models.audio_vae import AudioVAE
from voxcpm_core.models.audio_vae_v2 import AudioVAEV2
from voxcpm_core.models.batch import TrainBatch
from voxcpm_core.models.voxcpm import VoxCPMModel
from voxcpm_core.models.voxcpm2 import VoxCPM2Model

DEFAULT_ARCHITECTURE = "voxcpm"


@dataclass(frozen=True)
class Family:
    architecture: str  # config.json's "architecture", lower case
    parse_config: Callable[[Mapping, str], Any]  # (config.json object, source) -> the family's config model
    network: type[nn.Module]  # every non-VAE weight, built from the parsed config
    vae: type[nn.Module]  # the audio VAE, built from the config's audio_vae_config
    batch: type  # the training batch the network's forward reads
    collate: Callable[[Sequence], Any]  # dataset items (text ids, latents, dataset id) -> one batch
    # the prompt modes generation offers (generation/ sits above this registry and reads it, never the reverse)
    generation_modes: tuple[str, ...]
    # at most this many audio patches that end a prompted prefix are decoded in front of the new ones, then cut
    context_patches: int

    def build_vae(self, config) -> nn.Module:
        return self.vae(config.audio_vae_config)


FAMILIES = {
    family.architecture: family
    for family in (
        Family(
            architecture="voxcpm",  # VoxCPM-0.5B, VoxCPM1.5
            parse_config=parse_model_config,  # -> VoxCPMConfig
            network=VoxCPMModel,
            vae=AudioVAE,
            batch=TrainBatch,
            collate=collate,
            generation_modes=("zero-shot", "continuation"),  # continuation: prompt audio + its transcript
            context_patches=2,
        ),
        Family(
            architecture="voxcpm2",  # VoxCPM2
            parse_config=parse_model2_config,  # -> VoxCPM2Config
            network=VoxCPM2Model,
            vae=AudioVAEV2,
            batch=TrainBatch,
            collate=collate,
            # reference: a clip of the voice without its transcript; combined: reference + continuation
            generation_modes=("zero-shot", "continuation", "reference", "combined"),
            context_patches=3,
        ),
    )
}


def family_named(architecture: str, source: str = "config.json") -> Family:
    """The entry for ``architecture`` (any case); an unknown one is a one-line ``VoxCPMError``."""
    family = FAMILIES.get(str(architecture).lower())
    if family is None:
        raise VoxCPMError(
            f"{source}: unknown architecture {architecture!r}; known architectures: {', '.join(FAMILIES)}; "
            "use a model directory of one of them"
        )
    return family


def parse_config(data: Mapping, source: str = "config.json"):
    """``data`` (a ``config.json`` object) validated by its family's config model; errors are one line."""
    family = family_named(data.get("architecture", DEFAULT_ARCHITECTURE), source)
    return family.parse_config({**data, "architecture": family.architecture}, source)


def family_of(config) -> Family:
    """The entry of a config that ``parse_config`` returned."""
    return FAMILIES[config.architecture]
