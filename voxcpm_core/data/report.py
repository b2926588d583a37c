"""What ``voxcpm data validate`` reports: the issues and typed statistics of one manifest.

Pure data; ``to_dict`` is the ``--json`` form (plain dicts and lists, counted values as string keys).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from voxcpm_core.data.manifest import ERROR, WARNING, Issue, ManifestEntry


@dataclass(frozen=True)
class Spread:
    """How some values spread; ``p95`` only where it was asked for."""

    min: float
    median: float
    max: float
    mean: float
    p95: float | None = None

    @classmethod
    def of(cls, values: list[float], with_p95: bool = True) -> Spread | None:
        if not values:
            return None
        arr = np.asarray(values, dtype=np.float64)
        p95 = float(np.percentile(arr, 95)) if with_p95 else None
        return cls(float(arr.min()), float(np.median(arr)), float(arr.max()), float(arr.mean()), p95)

    def to_dict(self) -> dict[str, float]:
        head = {"min": self.min, "median": self.median} | ({"p95": self.p95} if self.p95 is not None else {})
        return head | {"max": self.max, "mean": self.mean}


@dataclass(frozen=True)
class LineCounts:
    total: int  # non-blank lines
    ok: int
    with_errors: int
    with_warnings: int  # warnings and no error


@dataclass(frozen=True)
class SequenceStats:
    """Estimated training sequence lengths (positions) against the token budgets."""

    tokens: Spread
    max_batch_tokens: int | None
    batch_size: int | None
    over_max_batch_tokens: int | None = None  # with max_batch_tokens: training drops these
    per_sample_budget: int | None = None  # with batch_size too: max_batch_tokens // batch_size
    over_per_sample_budget: int | None = None

    def to_dict(self) -> dict:
        budgets = {
            "over_max_batch_tokens": self.over_max_batch_tokens,
            "per_sample_budget": self.per_sample_budget,
            "over_per_sample_budget": self.over_per_sample_budget,
        }
        return (
            self.tokens.to_dict()
            | {"max_batch_tokens": self.max_batch_tokens, "batch_size": self.batch_size}
            | {key: value for key, value in budgets.items() if value is not None}
        )


@dataclass(frozen=True)
class CheckOptions:
    sample_rate: int | None  # the model's rate
    patch_samples: int | None  # waveform samples per LM position at that rate
    strict: bool
    deep: bool


@dataclass(frozen=True)
class ManifestStats:
    lines: LineCounts
    readable_audio: int  # samples whose audio header could be read
    total_hours: float
    duration_s: Spread | None
    text_chars: Spread | None
    dataset_ids: dict[int, int]  # dataset_id -> samples with it; likewise the next four
    sample_rates: dict[int, int]
    channels: dict[int, int]
    formats: dict[str, int]
    path_rules: dict[str, int]
    sequence: SequenceStats | None  # None without a tokenizer and a patch size
    issue_counts: dict[str, int]  # issue code -> occurrences
    options: CheckOptions

    def to_dict(self) -> dict:
        """JSON-ready: nested plain dicts, counted values as string keys."""
        return {
            "lines": asdict(self.lines),
            "readable_audio": self.readable_audio,
            "total_hours": self.total_hours,
            "duration_s": _dict_or_none(self.duration_s),
            "text_chars": _dict_or_none(self.text_chars),
            "dataset_ids": _str_keys(self.dataset_ids),
            "sample_rates": _str_keys(self.sample_rates),
            "channels": _str_keys(self.channels),
            "formats": self.formats,
            "path_rules": self.path_rules,
            "sequence": _dict_or_none(self.sequence),
            "issue_counts": self.issue_counts,
            "options": asdict(self.options),
        }


def _dict_or_none(stats: Spread | SequenceStats | None) -> dict | None:
    return None if stats is None else stats.to_dict()


def _str_keys(counts: dict[int, int]) -> dict[str, int]:
    return {str(key): count for key, count in counts.items()}


@dataclass
class ValidationReport:
    manifest: Path  # as given
    entries: list[ManifestEntry]  # every line that parsed, good or bad
    issues: list[Issue]  # sorted by line
    stats: ManifestStats

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == ERROR]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def bad_lines(self) -> set[int]:
        return {i.line for i in self.errors if i.line is not None}

    def good_entries(self) -> list[ManifestEntry]:
        bad = self.bad_lines
        return [e for e in self.entries if e.line not in bad]

    def to_dict(self) -> dict:
        """Everything but the entries, JSON-ready."""
        return {
            "manifest": str(self.manifest),
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "stats": self.stats.to_dict(),
            "issues": [asdict(i) for i in self.issues],
        }
