"""The knobs of one generation and their defaults, written once: the API's and the CLI's defaults read them.

No torch here, so the CLI can build its options from these defaults without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from voxcpm_core.errors import VoxCPMError

MAX_PATCHES_PER_TOKEN, MAX_PATCHES_EXTRA = 6, 10  # max_len cap: tokens * 6 + 10


@dataclass(frozen=True)
class SamplingOptions:
    """Knobs of one generation (the reference high-level API's names and defaults)."""

    cfg_value: float = 2.0
    inference_timesteps: int = 10
    min_len: int = 2
    max_len: int = 4096
    retry_badcase: bool = True
    retry_badcase_max_times: int = 3
    retry_badcase_ratio_threshold: float = 6.0

    def __post_init__(self) -> None:
        checks = [
            ("inference_timesteps", self.inference_timesteps >= 1, ">= 1"),
            ("min_len", self.min_len >= 0, ">= 0"),
            ("max_len", self.max_len >= 1, ">= 1"),
            ("retry_badcase_max_times", self.retry_badcase_max_times >= 1, ">= 1"),
            ("cfg_value", math.isfinite(self.cfg_value), "a finite number"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise VoxCPMError(
                    f"generation option: {name} must be {wanted}, got {getattr(self, name)}", param=name
                )


def max_patches(target_tokens: int, max_len: int) -> int:
    """``max_len`` capped at int(target tokens * 6 + 10), as the reference does."""
    return min(max_len, int(target_tokens * MAX_PATCHES_PER_TOKEN + MAX_PATCHES_EXTRA))
