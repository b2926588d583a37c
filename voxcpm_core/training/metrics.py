"""Training metrics sinks: TensorBoard scalars and audio, plus ``<save_path>/metrics.jsonl``.

Only rank 0 builds a ``TrainLogger``. On resume, lines and events after the resumed step are
dropped so a resumed run's history reads like an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from voxcpm_core.io.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class TrainLogger:
    """One JSON line per logged step and the same values as TensorBoard scalars (if a folder is given)."""

    def __init__(self, save_path: Path, tensorboard_dir: Path | None, resume_step: int = 0):
        self.metrics_path = Path(save_path) / METRICS_FILE
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.metrics_path, resume_step)
        self._jsonl = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        # purge_step hides events a killed run wrote after the checkpoint we resume from.
        self._tb = None
        if tensorboard_dir is not None:
            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()

    def log_audio(self, step: int, tag: str, wav: np.ndarray, sample_rate: int) -> None:
        """A mono float waveform in [-1, 1] as a TensorBoard audio clip."""
        if self._tb is None:
            return
        self._tb.add_audio(tag, np.asarray(wav, dtype=np.float32).reshape(1, -1), step, sample_rate=sample_rate)
        self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the lines of ``path`` whose step is <= ``step`` (all of them go when step is 0)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic_write_text(path, "".join(kept))


def read_metrics(save_path: Path) -> list[dict]:
    """Every line of ``<save_path>/metrics.jsonl`` as a dict (for tests and tools)."""
    path = Path(save_path) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
