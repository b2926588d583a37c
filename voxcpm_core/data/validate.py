"""The checks behind ``voxcpm data validate``: audio files, sample rates, durations, duplicates,
sequence lengths and (``deep``) the decoded samples of every line a manifest parse kept.

``validate_manifest`` returns a ``ValidationReport``: problems are issues in it, never exceptions.
"""

from __future__ import annotations

import math
import os
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from voxcpm_core.data.audio import AudioInfo, audio_info
from voxcpm_core.data.manifest import (
    ERROR,
    WARNING,
    Issue,
    ManifestEntry,
    ParsedManifest,
    parse_manifest,
    show_value,
)
from voxcpm_core.data.report import (
    CheckOptions,
    LineCounts,
    ManifestStats,
    SequenceStats,
    Spread,
    ValidationReport,
)
from voxcpm_core.data.tokenizer import sequence_length
from voxcpm_core.errors import VoxCPMError

DURATION_TOLERANCE_S = 0.1  # declared vs. header duration
MIN_DURATION_S = 0.3
MAX_DURATION_S = 30.0
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped
CLIP_FRACTION = 0.001  # warn when more than 0.1 % of samples are clipped
SILENCE_PEAK = 0.001  # -60 dBFS
DECODE_BLOCK = 1 << 20  # frames per block in --deep decoding


def default_workers() -> int:
    """Header reads wait on the disk more than the CPU: a few threads per core."""
    return min(32, 4 * (os.cpu_count() or 1))


# ----------------------------------------------------------------------------- audio checks


@dataclass
class _FileFacts:
    """What one audio file looks like; ``problem`` = (code, message) when it cannot be used."""

    info: AudioInfo | None = None
    problem: tuple[str, str] | None = None
    deep: list[tuple[str, str, str]] = field(default_factory=list)  # (severity, code, message)

    @property
    def usable(self) -> bool:
        return self.info is not None and self.problem is None


def _probe(path: Path, deep: bool) -> _FileFacts:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return _FileFacts(problem=("audio_missing", ""))  # the issue names the folders searched
    if not stat.S_ISREG(st.st_mode):
        return _FileFacts(problem=("audio_not_file", f"{show_value(str(path))} is not a regular file"))
    if st.st_size == 0:
        return _FileFacts(problem=("audio_empty", f"{show_value(str(path))} is an empty file (0 bytes)"))
    try:
        info = audio_info(path)
    except VoxCPMError as exc:
        return _FileFacts(problem=("audio_unreadable", str(exc)))
    if info.frames == 0:
        return _FileFacts(info, ("audio_empty", f"{show_value(str(path))} has no samples"))
    facts = _FileFacts(info)
    if deep:
        facts.deep = _decode_checks(path)
    return facts


def _decode_checks(path: Path) -> list[tuple[str, str, str]]:
    """Decode in blocks (bounded memory for long files): NaN/inf, clipping, silence."""
    total = non_finite = clipped = 0
    peak = 0.0
    try:
        for block in sf.blocks(path, blocksize=DECODE_BLOCK, dtype="float32", always_2d=True):
            # block: [n, channels]
            finite = np.isfinite(block)
            magnitude = np.abs(np.where(finite, block, 0.0))
            total += block.size
            non_finite += int(block.size - finite.sum())
            clipped += int((magnitude >= CLIP_LEVEL).sum())
            peak = max(peak, float(magnitude.max(initial=0.0)))
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        return [(ERROR, "audio_undecodable", f"the header is fine but decoding fails ({exc})")]
    found = []
    if non_finite:
        found.append((ERROR, "non_finite", f"{non_finite} samples are NaN or infinite; re-export the file"))
    if total and clipped / total > CLIP_FRACTION:
        message = f"{clipped / total:.2%} of samples are clipped; lower the gain before exporting"
        found.append((WARNING, "clipping", message))
    if peak < SILENCE_PEAK:
        level = f"{20 * math.log10(peak):.0f} dBFS" if peak > 0 else "digital zero"
        found.append((WARNING, "silence", f"the audio is silent (peak {level})"))
    return found


def _file_issues(
    parsed: ParsedManifest, entry: ManifestEntry, facts: _FileFacts, sample_rate: int | None, strict: bool
) -> list[Issue]:
    line = entry.line
    if facts.problem is not None:
        code, message = facts.problem
        if code == "audio_missing":
            return [parsed.missing_audio(entry)]
        return [Issue.of(line, ERROR, code, message)]
    info = facts.info
    found = []  # (severity, code, message)
    if info.channels > 1:
        found.append((WARNING, "multichannel", f"{info.channels} channels; training mixes them to mono"))
    if sample_rate is not None and info.sample_rate != sample_rate:
        if strict:
            fix = f"resample it first (e.g. `sox in.wav -r {sample_rate} out.wav`) or validate without strict"
            message = f"{info.sample_rate} Hz, the model needs {sample_rate} Hz; {fix}"
            found.append((ERROR, "sample_rate", message))
        else:
            message = f"{info.sample_rate} Hz, the model uses {sample_rate} Hz; it will be resampled"
            found.append((WARNING, "sample_rate", message))
    if entry.duration is not None and abs(entry.duration - info.duration) > DURATION_TOLERANCE_S:
        said, real = f"{entry.duration:.2f} s", f"{info.duration:.2f} s"
        message = f'"duration" says {said}, the file is {real}; fix or remove the field'
        found.append((WARNING, "duration_mismatch", message))
    if info.duration < MIN_DURATION_S:
        found.append((WARNING, "too_short", f"only {info.duration:.2f} s long (< {MIN_DURATION_S} s)"))
    elif info.duration > MAX_DURATION_S:
        message = f"{info.duration:.1f} s long (> {MAX_DURATION_S:.0f} s); consider splitting it"
        found.append((WARNING, "too_long", message))
    if not info.is_wav:
        found.append((WARNING, "not_wav", f"{info.format} file; the guide asks for WAV (it still decodes)"))
    return [Issue.of(line, severity, code, message) for severity, code, message in found + facts.deep]


def _duplicate_issues(entries: list[ManifestEntry]) -> list[Issue]:
    first_audio: dict[str, int] = {}
    first_pair: dict[tuple[str, str], int] = {}
    found = []
    for e in entries:
        key = os.path.normpath(e.audio)
        if (key, e.text) in first_pair:
            message = f"same audio and text as line {first_pair[key, e.text]}"
            found.append(Issue.of(e.line, WARNING, "duplicate_pair", message))
        elif key in first_audio:
            message = f"same audio file as line {first_audio[key]} (with another text)"
            found.append(Issue.of(e.line, WARNING, "duplicate_audio", message))
        first_audio.setdefault(key, e.line)
        first_pair.setdefault((key, e.text), e.line)
    return found


# ----------------------------------------------------------------------------- statistics


def _sequence_lengths(
    entries: list[ManifestEntry],
    facts_by_line: dict[int, _FileFacts],
    tokenizer,
    sample_rate: int | None,
    patch_samples: int,
) -> dict[int, int]:
    """Line -> estimated training sequence length of each sample whose audio is readable."""
    lengths = {}
    for e in entries:
        facts = facts_by_line[e.line]
        if not facts.usable:
            continue
        info = facts.info
        samples = info.frames if sample_rate is None else round(info.frames * sample_rate / info.sample_rate)
        lengths[e.line] = sequence_length(len(tokenizer.encode(e.text)), math.ceil(samples / patch_samples))
    return lengths


def _sequence_stats(
    lengths: list[int], max_batch_tokens: int | None, batch_size: int | None
) -> SequenceStats | None:
    if not lengths:
        return None
    over = per_sample = over_per_sample = None
    if max_batch_tokens:
        over = sum(n > max_batch_tokens for n in lengths)
        if batch_size:
            per_sample = max_batch_tokens // batch_size
            over_per_sample = sum(n > per_sample for n in lengths)
    return SequenceStats(Spread.of(lengths), max_batch_tokens, batch_size, over, per_sample, over_per_sample)


def _counts(values) -> dict:
    """Value -> occurrences, sorted by value."""
    return dict(sorted(Counter(values).items()))


def _stats(
    parsed: ParsedManifest,
    issues: list[Issue],
    facts_by_line: dict[int, _FileFacts],
    sequence: SequenceStats | None,
    options: CheckOptions,
) -> ManifestStats:
    entries = parsed.entries
    error_lines = {i.line for i in issues if i.severity == ERROR} - {None}
    warning_lines = {i.line for i in issues if i.severity == WARNING} - error_lines - {None}
    infos = [facts_by_line[e.line].info for e in entries if facts_by_line[e.line].usable]
    durations = [i.duration for i in infos]
    ok = parsed.lines - len(error_lines) - len(warning_lines)
    return ManifestStats(
        lines=LineCounts(parsed.lines, ok, len(error_lines), len(warning_lines)),
        readable_audio=len(infos),
        total_hours=sum(durations) / 3600,
        duration_s=Spread.of(durations),
        text_chars=Spread.of([len(e.text) for e in entries], with_p95=False),
        dataset_ids=_counts(e.dataset_id for e in entries),
        sample_rates=_counts(i.sample_rate for i in infos),
        channels=_counts(i.channels for i in infos),
        formats=dict(Counter(i.format for i in infos).most_common()),
        path_rules=dict(Counter(e.path_rule for e in entries).most_common()),
        sequence=sequence,
        issue_counts=dict(Counter(i.code for i in issues).most_common()),
        options=options,
    )


# ----------------------------------------------------------------------------- validate


def validate_manifest(
    path: str | os.PathLike,
    sample_rate: int | None = None,
    tokenizer=None,
    patch_samples: int | None = None,
    max_batch_tokens: int | None = None,
    batch_size: int | None = None,
    strict: bool = False,
    deep: bool = False,
    workers: int | None = None,
) -> ValidationReport:
    """Every check of ``voxcpm data validate``; problems are issues in the report, not exceptions.

    Only an unreadable manifest file raises ``VoxCPMError``. ``sample_rate`` is the model's rate
    (mismatches warn; ``strict`` makes them errors). With ``tokenizer`` (``.encode(text)``) and
    ``patch_samples`` (waveform samples per LM token at the model rate) each sample's sequence
    length is estimated, and samples over ``max_batch_tokens`` are flagged (training drops them).
    ``deep`` decodes every file to look for NaN/inf, clipping and silence.
    """
    if max_batch_tokens is not None and (tokenizer is None or patch_samples is None):
        raise VoxCPMError("max_batch_tokens needs the model's tokenizer and patch_samples: give both", param="tokenizer")
    for name, value in (
        ("sample_rate", sample_rate),
        ("patch_samples", patch_samples),
        ("max_batch_tokens", max_batch_tokens),
        ("batch_size", batch_size),
        ("workers", workers),
    ):
        if value is not None and value <= 0:
            raise VoxCPMError(f"{name} must be > 0, got {value}")

    parsed = parse_manifest(path)
    entries, issues = parsed.entries, list(parsed.issues)
    unique = list(dict.fromkeys(os.path.normpath(e.audio) for e in entries))
    with ThreadPoolExecutor(max_workers=min(workers or default_workers(), max(len(unique), 1))) as pool:
        facts = dict(zip(unique, pool.map(lambda p: _probe(Path(p), deep), unique), strict=True))
    facts_by_line = {e.line: facts[os.path.normpath(e.audio)] for e in entries}

    for e in entries:
        issues += _file_issues(parsed, e, facts_by_line[e.line], sample_rate, strict)
    issues += _duplicate_issues(entries)

    seq_lengths = {}
    if tokenizer is not None and patch_samples is not None:
        seq_lengths = _sequence_lengths(entries, facts_by_line, tokenizer, sample_rate, patch_samples)
        if max_batch_tokens:
            issues += [
                Issue.of(
                    line,
                    WARNING,
                    "over_max_batch_tokens",
                    f"about {n} tokens > max_batch_tokens {max_batch_tokens}; training drops this sample",
                )
                for line, n in seq_lengths.items()
                if n > max_batch_tokens
            ]

    issues.sort(key=lambda i: (i.line or 0, i.severity != ERROR))
    sequence = _sequence_stats(list(seq_lengths.values()), max_batch_tokens, batch_size)
    options = CheckOptions(sample_rate, patch_samples, strict, deep)
    stats = _stats(parsed, issues, facts_by_line, sequence, options)
    return ValidationReport(Path(path), entries, issues, stats)
