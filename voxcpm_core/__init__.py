"""voxcpm_core: the VoxCPM engine (model, checkpoints, data, training, generation, LoRA)."""

__version__ = "0.1.0"

from voxcpm_core.errors import VoxCPMError  # noqa: E402

__all__ = ["LoRAConfig", "VoxCPM", "VoxCPMError", "__version__"]

_LAZY = {"VoxCPM": "voxcpm_core.api", "LoRAConfig": "voxcpm_core.models.lora"}


def __getattr__(name: str):
    """``VoxCPM`` and ``LoRAConfig`` import torch, so they load on first use: ``import voxcpm_core`` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'voxcpm_core' has no attribute {name!r}")
