"""JSONL training manifests: parse each line, resolve audio paths, and check what training relies on.

One sample per line: ``{"audio": "clips/a.wav", "text": "...", "duration": 3.5, "dataset_id": 0}``
(``duration`` and ``dataset_id`` optional). A relative ``audio`` path resolves against the
manifest's folder first, then the current directory; the trainer uses the same rule.

``read_manifest`` is what the trainer calls (raises on bad lines); ``validate_manifest`` is the
full check behind ``voxcpm data validate`` and returns a ``ValidationReport`` (pure data).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from voxcpm_core.data.audio import AudioInfo, audio_info
from voxcpm_core.errors import VoxCPMError

REQUIRED_KEYS = ("audio", "text")
OPTIONAL_KEYS = ("duration", "dataset_id")
KNOWN_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS

DURATION_TOLERANCE_S = 0.1  # declared vs. header duration
MIN_DURATION_S = 0.3
MAX_DURATION_S = 30.0
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped
CLIP_FRACTION = 0.001  # warn when more than 0.1 % of samples are clipped
SILENCE_PEAK = 0.001  # -60 dBFS
DECODE_BLOCK = 1 << 20  # frames per block in --deep decoding
MAX_DATASET_ID = 2**31 - 1
# Files passed as a manifest by mistake: (leading bytes, what they are).
NOT_JSONL = (
    (b"RIFF", "a WAV file"),
    (b"fLaC", "a FLAC file"),
    (b"OggS", "an Ogg file"),
    (b"ID3", "an MP3 file"),
    (b"\xff\xfe", "UTF-16 text"),
    (b"\xfe\xff", "UTF-16 text"),
)

ERROR, WARNING = "error", "warning"
# How a relative audio path was resolved (``ManifestEntry.path_rule``).
ABSOLUTE, MANIFEST_DIR, CWD, NOT_FOUND = "absolute", "manifest_dir", "cwd", "not_found"


def default_workers() -> int:
    """Header reads wait on the disk more than the CPU: a few threads per core."""
    return min(32, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class ManifestEntry:
    line: int  # 1-based line number in the manifest
    audio: Path  # resolved path (absolute when the manifest path was)
    audio_raw: str  # as written in the manifest
    path_rule: str  # ABSOLUTE, MANIFEST_DIR, CWD or NOT_FOUND
    text: str
    duration: float | None = None
    dataset_id: int = 0


@dataclass(frozen=True)
class Issue:
    line: int | None  # None: the manifest as a whole
    severity: str  # ERROR or WARNING
    code: str  # stable identifier for scripts, e.g. "audio_missing"
    message: str


@dataclass
class ValidationReport:
    manifest: Path
    entries: list[ManifestEntry]  # every line that parsed, good or bad
    issues: list[Issue]  # sorted by line
    stats: dict = field(default_factory=dict)

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
            "stats": self.stats,
            "issues": [asdict(i) for i in self.issues],
        }


# ----------------------------------------------------------------------------- parsing


def _show(value: object, limit: int = 80) -> str:
    """A user value as a short, printable JSON literal (control characters escaped)."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _issue(line: int | None, severity: str, code: str, message: str) -> Issue:
    # Lone surrogates from JSON escapes would crash printing; make them visible instead.
    return Issue(line, severity, code, message.encode("utf-8", "backslashreplace").decode("utf-8"))


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _optional_duration(obj: dict, line: int, issues: list[Issue]) -> float | None:
    value = obj.get("duration")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        issues.append(
            _issue(
                line, ERROR, "wrong_type", f'"duration" must be seconds as a number, got {_json_type(value)}'
            )
        )
        return None
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not (math.isfinite(seconds) and seconds > 0):
        issues.append(
            _issue(
                line, ERROR, "bad_duration", f'"duration" must be a number > 0 (seconds), got {_show(value)}'
            )
        )
        return None
    return seconds


def _optional_dataset_id(obj: dict, line: int, issues: list[Issue]) -> int:
    value = obj.get("dataset_id")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DATASET_ID:
        issues.append(
            _issue(
                line,
                ERROR,
                "bad_dataset_id",
                f'"dataset_id" must be an integer from 0 to {MAX_DATASET_ID}, got {_show(value)}',
            )
        )
        return 0
    return value


def _required_string(
    obj: dict, key: str, line: int, issues: list[Issue], near_misses: dict[str, str]
) -> str | None:
    what = "the audio file path" if key == "audio" else "the transcript"
    if key not in obj:
        hint = f' (found "{near_misses[key]}": rename it to "{key}")' if key in near_misses else ""
        issues.append(_issue(line, ERROR, "missing_field", f'missing "{key}", {what}{hint}'))
        return None
    value = obj[key]
    if not isinstance(value, str):
        issues.append(
            _issue(line, ERROR, "wrong_type", f'"{key}" must be a string ({what}), got {_json_type(value)}')
        )
        return None
    if not value.strip():
        issues.append(_issue(line, ERROR, "empty_field", f'"{key}" is empty; give {what}'))
        return None
    if not _valid_unicode(value) or "\x00" in value:
        issues.append(
            _issue(line, ERROR, "bad_string", f'"{key}" contains invalid characters: {_show(value)}')
        )
        return None
    return value


def parse_line(text: str, line: int) -> tuple[dict | None, list[Issue]]:
    """One manifest line -> (fields {audio, text, duration, dataset_id} or None, issues). Never raises."""
    issues: list[Issue] = []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [_issue(line, ERROR, "bad_json", f"not valid JSON: {exc.msg} at column {exc.colno}")]
    except (ValueError, RecursionError) as exc:  # e.g. integers over 4300 digits, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return None, [_issue(line, ERROR, "bad_json", f"not valid JSON: {reason}")]
    if not isinstance(obj, dict):
        return None, [
            _issue(
                line,
                ERROR,
                "not_object",
                f'expected a JSON object {{"audio": ..., "text": ...}}, got {_json_type(obj)}',
            )
        ]

    # Unknown keys that look like a known key the line lacks, e.g. "audo" -> "audio".
    unknown = [key for key in obj if key not in KNOWN_KEYS]
    near_misses: dict[str, str] = {}  # known key -> the unknown key that looks like it
    for key in unknown:
        match = difflib.get_close_matches(key.strip().lower(), KNOWN_KEYS, n=1, cutoff=0.6)
        if match and match[0] not in obj:
            near_misses.setdefault(match[0], key)

    audio = _required_string(obj, "audio", line, issues, near_misses)
    transcript = _required_string(obj, "text", line, issues, near_misses)
    for key in unknown:
        guess = next((known for known, k in near_misses.items() if k == key), None)
        if guess in REQUIRED_KEYS:
            continue  # the missing-field error already names it
        hint = f'did you mean "{guess}"?' if guess else "known keys: " + ", ".join(KNOWN_KEYS)
        issues.append(
            _issue(line, WARNING, "unknown_key", f"unknown key {_show(key, 40)} is ignored; {hint}")
        )
    duration = _optional_duration(obj, line, issues)
    dataset_id = _optional_dataset_id(obj, line, issues)
    if any(i.severity == ERROR for i in issues):
        return None, issues
    return {"audio": audio, "text": transcript, "duration": duration, "dataset_id": dataset_id}, issues


def resolve_audio_path(raw: str, manifest_dir: Path, cwd: Path) -> tuple[Path, str]:
    """Absolute paths stay; relative ones try the manifest's folder, then ``cwd``."""
    path = Path(os.path.expanduser(raw))
    if path.is_absolute():
        return path, ABSOLUTE
    for base, rule in ((manifest_dir, MANIFEST_DIR), (cwd, CWD)):
        if os.path.exists(base / path):  # False (not an exception) for NUL bytes, too-long names
            return base / path, rule
    return manifest_dir / path, NOT_FOUND


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise VoxCPMError(
            f"{path}: manifest not found; pass a JSONL file with one "
            '{"audio": "...", "text": "..."} object per line'
        ) from None
    except IsADirectoryError:
        raise VoxCPMError(f"{path}: is a directory; pass the manifest file (JSONL) inside it") from None
    except OSError as exc:
        raise VoxCPMError(f"{path}: cannot read the manifest ({exc.strerror})") from None


def _parse_manifest(path: Path) -> tuple[list[ManifestEntry], list[Issue], int]:
    """Entries, parse issues and the number of non-blank lines."""
    path = Path(os.path.abspath(path))
    manifest_dir, cwd = path.parent, Path.cwd()
    entries: list[ManifestEntry] = []
    issues: list[Issue] = []
    data = _read_bytes(path)
    kind = next((what for magic, what in NOT_JSONL if data.startswith(magic)), None)
    if kind is not None:
        return [], [_issue(None, ERROR, "not_jsonl", f"this is {kind}, not a UTF-8 JSONL manifest")], 0
    blank = number = 0
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            text = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append(
                _issue(
                    number,
                    ERROR,
                    "not_utf8",
                    f"not UTF-8 text (byte {exc.start + 1}); save the manifest as UTF-8",
                )
            )
            continue
        if not text.strip():
            blank += 1
            continue
        fields, line_issues = parse_line(text, number)
        issues.extend(line_issues)
        if fields is not None:
            raw_audio = fields.pop("audio")
            audio, rule = resolve_audio_path(raw_audio, manifest_dir, cwd)
            entries.append(ManifestEntry(number, audio, raw_audio, rule, **fields))
    if not entries and not issues:
        issues.append(
            _issue(None, ERROR, "empty_manifest", "the manifest has no samples (every line is blank)")
        )
    return entries, issues, number - blank


def _missing_message(entry: ManifestEntry, manifest_dir: Path, cwd: Path) -> str:
    if entry.path_rule == ABSOLUTE:
        return f"audio file not found: {_show(entry.audio_raw)}"
    if manifest_dir == cwd:
        return f"audio file not found: {_show(entry.audio_raw)} (looked in {_show(str(cwd))})"
    return (
        f"audio file not found: {_show(entry.audio_raw)} (looked in the manifest's folder "
        f"{_show(str(manifest_dir))} and the current directory {_show(str(cwd))})"
    )


def _one_line_summary(path: Path, errors: list[Issue], shown: int = 5) -> str:
    lines = sorted({i.line for i in errors if i.line is not None})
    parts = [f"line {i.line}: {i.message}" if i.line else i.message for i in errors[:shown]]
    more = f"; ... and {len(errors) - shown} more" if len(errors) > shown else ""
    return (
        f"{path}: {len(lines) or 1} bad line(s): "
        + "; ".join(parts)
        + more
        + f"; run `voxcpm data validate {path}` for the full report"
    )


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Parse a manifest for training; any bad line (or missing audio file) raises one ``VoxCPMError``."""
    path = Path(path)
    entries, issues, _ = _parse_manifest(path)
    manifest_dir, cwd = Path(os.path.abspath(path)).parent, Path.cwd()
    errors = [i for i in issues if i.severity == ERROR]
    errors += [
        _issue(e.line, ERROR, "audio_missing", _missing_message(e, manifest_dir, cwd))
        for e in entries
        if not os.path.isfile(e.audio)
    ]
    if errors:
        errors.sort(key=lambda i: i.line or 0)
        raise VoxCPMError(_one_line_summary(path, errors))
    return entries


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
        return _FileFacts(problem=("audio_missing", ""))  # message filled in by the caller
    if not stat.S_ISREG(st.st_mode):
        return _FileFacts(problem=("audio_not_file", f"{_show(str(path))} is not a regular file"))
    if st.st_size == 0:
        return _FileFacts(problem=("audio_empty", f"{_show(str(path))} is an empty file (0 bytes)"))
    try:
        info = audio_info(path)
    except VoxCPMError as exc:
        return _FileFacts(problem=("audio_unreadable", str(exc)))
    if info.frames == 0:
        return _FileFacts(info, ("audio_empty", f"{_show(str(path))} has no samples"))
    facts = _FileFacts(info)
    if deep:
        facts.deep = _decode_checks(path)
    return facts


def _decode_checks(path: Path) -> list[tuple[str, str, str]]:
    """Decode in blocks (bounded memory for long files): NaN/inf, clipping, silence."""
    total = non_finite = clipped = 0
    peak = 0.0
    try:
        for block in sf.blocks(
            path, blocksize=DECODE_BLOCK, dtype="float32", always_2d=True
        ):  # [n, channels]
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
        found.append(
            (
                WARNING,
                "clipping",
                f"{clipped / total:.2%} of samples are clipped; lower the gain before exporting",
            )
        )
    if peak < SILENCE_PEAK:
        level = f"{20 * math.log10(peak):.0f} dBFS" if peak > 0 else "digital zero"
        found.append((WARNING, "silence", f"the audio is silent (peak {level})"))
    return found


def _file_issues(
    entry: ManifestEntry,
    facts: _FileFacts,
    sample_rate: int | None,
    strict: bool,
    manifest_dir: Path,
    cwd: Path,
) -> list[Issue]:
    line = entry.line
    if facts.problem is not None:
        code, message = facts.problem
        if code == "audio_missing":
            message = _missing_message(entry, manifest_dir, cwd)
        return [_issue(line, ERROR, code, message)]
    info = facts.info
    found = []
    if info.channels > 1:
        found.append(
            _issue(line, WARNING, "multichannel", f"{info.channels} channels; training mixes them to mono")
        )
    if sample_rate is not None and info.sample_rate != sample_rate:
        if strict:
            fix = f"resample it first (e.g. `sox in.wav -r {sample_rate} out.wav`) or drop --strict"
            found.append(
                _issue(
                    line,
                    ERROR,
                    "sample_rate",
                    f"{info.sample_rate} Hz, the model needs {sample_rate} Hz; {fix}",
                )
            )
        else:
            found.append(
                _issue(
                    line,
                    WARNING,
                    "sample_rate",
                    f"{info.sample_rate} Hz, the model uses {sample_rate} Hz; it will be resampled",
                )
            )
    if entry.duration is not None and abs(entry.duration - info.duration) > DURATION_TOLERANCE_S:
        found.append(
            _issue(
                line,
                WARNING,
                "duration_mismatch",
                f'"duration" says {entry.duration:.2f} s, the file is {info.duration:.2f} s; fix or remove the field',
            )
        )
    if info.duration < MIN_DURATION_S:
        found.append(
            _issue(line, WARNING, "too_short", f"only {info.duration:.2f} s long (< {MIN_DURATION_S} s)")
        )
    elif info.duration > MAX_DURATION_S:
        found.append(
            _issue(
                line,
                WARNING,
                "too_long",
                f"{info.duration:.1f} s long (> {MAX_DURATION_S:.0f} s); consider splitting it",
            )
        )
    if not info.is_wav:
        found.append(
            _issue(line, WARNING, "not_wav", f"{info.format} file; the guide asks for WAV (it still decodes)")
        )
    found += [_issue(line, severity, code, message) for severity, code, message in facts.deep]
    return found


def _duplicate_issues(entries: list[ManifestEntry]) -> list[Issue]:
    first_audio: dict[str, int] = {}
    first_pair: dict[tuple[str, str], int] = {}
    found = []
    for e in entries:
        key = os.path.normpath(e.audio)
        if (key, e.text) in first_pair:
            found.append(
                _issue(
                    e.line,
                    WARNING,
                    "duplicate_pair",
                    f"same audio and text as line {first_pair[key, e.text]}",
                )
            )
        elif key in first_audio:
            found.append(
                _issue(
                    e.line,
                    WARNING,
                    "duplicate_audio",
                    f"same audio file as line {first_audio[key]} (with another text)",
                )
            )
        first_audio.setdefault(key, e.line)
        first_pair.setdefault((key, e.text), e.line)
    return found


# ----------------------------------------------------------------------------- statistics


def _summary(values: list[float], with_p95: bool = True) -> dict | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    out = {"min": float(arr.min()), "median": float(np.median(arr))}
    if with_p95:
        out["p95"] = float(np.percentile(arr, 95))
    out |= {"max": float(arr.max()), "mean": float(arr.mean())}
    return out


def _sequence_lengths(
    entries, facts_by_line, tokenizer, sample_rate: int | None, patch_samples: int
) -> dict[int, int]:
    """Line -> text tokens + 1 (audio start) + audio patches + 1 (audio end)."""
    lengths = {}
    for e in entries:
        facts = facts_by_line[e.line]
        if not facts.usable:
            continue
        info = facts.info
        samples = info.frames if sample_rate is None else round(info.frames * sample_rate / info.sample_rate)
        lengths[e.line] = len(tokenizer.encode(e.text)) + 1 + math.ceil(samples / patch_samples) + 1
    return lengths


def _stats(n_lines: int, entries, issues, facts_by_line, seq_lengths, max_batch_tokens, batch_size) -> dict:
    error_lines = {i.line for i in issues if i.severity == ERROR} - {None}
    warning_lines = {i.line for i in issues if i.severity == WARNING} - error_lines - {None}
    infos = [facts_by_line[e.line].info for e in entries if facts_by_line[e.line].usable]
    durations = [i.duration for i in infos]
    stats = {
        "lines": {
            "total": n_lines,
            "ok": n_lines - len(error_lines) - len(warning_lines),
            "with_errors": len(error_lines),
            "with_warnings": len(warning_lines),
        },
        "readable_audio": len(infos),
        "total_hours": sum(durations) / 3600,
        "duration_s": _summary(durations),
        "text_chars": _summary([len(e.text) for e in entries], with_p95=False),
        "dataset_ids": {str(k): v for k, v in sorted(Counter(e.dataset_id for e in entries).items())},
        "sample_rates": {str(k): v for k, v in sorted(Counter(i.sample_rate for i in infos).items())},
        "channels": {str(k): v for k, v in sorted(Counter(i.channels for i in infos).items())},
        "formats": dict(Counter(i.format for i in infos).most_common()),
        "path_rules": dict(Counter(e.path_rule for e in entries).most_common()),
        "sequence": None,
        "issue_counts": dict(Counter(i.code for i in issues).most_common()),
    }
    if seq_lengths:
        lengths = list(seq_lengths.values())
        seq = _summary(lengths) | {"max_batch_tokens": max_batch_tokens, "batch_size": batch_size}
        if max_batch_tokens:
            seq["over_max_batch_tokens"] = sum(n > max_batch_tokens for n in lengths)
            if batch_size:
                seq["per_sample_budget"] = max_batch_tokens // batch_size
                seq["over_per_sample_budget"] = sum(n > max_batch_tokens // batch_size for n in lengths)
        stats["sequence"] = seq
    return stats


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
        raise VoxCPMError("max_batch_tokens needs the model's tokenizer and patch size (pass --model DIR)")
    for name, value in (
        ("sample_rate", sample_rate),
        ("patch_samples", patch_samples),
        ("max_batch_tokens", max_batch_tokens),
        ("batch_size", batch_size),
        ("workers", workers),
    ):
        if value is not None and value <= 0:
            raise VoxCPMError(f"{name} must be > 0, got {value}")

    path = Path(path)
    entries, issues, n_lines = _parse_manifest(path)
    manifest_dir, cwd = Path(os.path.abspath(path)).parent, Path.cwd()

    unique = list(dict.fromkeys(os.path.normpath(e.audio) for e in entries))
    with ThreadPoolExecutor(max_workers=min(workers or default_workers(), max(len(unique), 1))) as pool:
        facts = dict(zip(unique, pool.map(lambda p: _probe(Path(p), deep), unique), strict=True))
    facts_by_line = {e.line: facts[os.path.normpath(e.audio)] for e in entries}

    for e in entries:
        issues += _file_issues(e, facts_by_line[e.line], sample_rate, strict, manifest_dir, cwd)
    issues += _duplicate_issues(entries)

    seq_lengths = {}
    if tokenizer is not None and patch_samples is not None:
        seq_lengths = _sequence_lengths(entries, facts_by_line, tokenizer, sample_rate, patch_samples)
        if max_batch_tokens:
            issues += [
                _issue(
                    line,
                    WARNING,
                    "over_max_batch_tokens",
                    f"about {n} tokens > max_batch_tokens {max_batch_tokens}; training drops this sample",
                )
                for line, n in seq_lengths.items()
                if n > max_batch_tokens
            ]

    issues.sort(key=lambda i: (i.line or 0, i.severity != ERROR))
    stats = _stats(n_lines, entries, issues, facts_by_line, seq_lengths, max_batch_tokens, batch_size)
    stats["options"] = {
        "sample_rate": sample_rate,
        "patch_samples": patch_samples,
        "strict": strict,
        "deep": deep,
    }
    return ValidationReport(path, entries, issues, stats)
