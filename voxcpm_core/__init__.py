"""voxcpm_core: the VoxCPM engine (model, checkpoints, data, training, generation, LoRA)."""

__version__ = "0.1.0"

from voxcpm_core.errors import VoxCPMError  # noqa: E402

__all__ = ["VoxCPMError", "__version__"]
