"""JSONL training manifests: parse each line into a typed entry and resolve its audio path.

One sample per line: ``{"audio": "clips/a.wav", "text": "...", "duration": 3.5, "dataset_id": 0}``
(``duration`` and ``dataset_id`` optional). A relative ``audio`` path resolves against the
manifest's folder first, then the current directory; the trainer uses the same rule.

``parse_manifest`` never raises on a bad line: problems are ``Issue``s. ``read_manifest`` is the
strict form (any bad line or missing audio file raises). The checks of the audio itself are
``voxcpm_core.data.validate``'s.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from voxcpm_core.errors import VoxCPMError

REQUIRED_KEYS = ("audio", "text")
OPTIONAL_KEYS = ("duration", "dataset_id")
KNOWN_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
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

    @classmethod
    def of(cls, line: int | None, severity: str, code: str, message: str) -> Issue:
        # Lone surrogates from JSON escapes would crash printing; make them visible instead.
        return cls(line, severity, code, message.encode("utf-8", "backslashreplace").decode("utf-8"))


# ----------------------------------------------------------------------------- parsing


def show_value(value: object, limit: int = 80) -> str:
    """A user value as a short, printable JSON literal (control characters escaped)."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


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
            Issue.of(
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
            Issue.of(
                line,
                ERROR,
                "bad_duration",
                f'"duration" must be a number > 0 (seconds), got {show_value(value)}',
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
            Issue.of(
                line,
                ERROR,
                "bad_dataset_id",
                f'"dataset_id" must be an integer from 0 to {MAX_DATASET_ID}, got {show_value(value)}',
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
        issues.append(Issue.of(line, ERROR, "missing_field", f'missing "{key}", {what}{hint}'))
        return None
    value = obj[key]
    if not isinstance(value, str):
        issues.append(
            Issue.of(line, ERROR, "wrong_type", f'"{key}" must be a string ({what}), got {_json_type(value)}')
        )
        return None
    if not value.strip():
        issues.append(Issue.of(line, ERROR, "empty_field", f'"{key}" is empty; give {what}'))
        return None
    if not _valid_unicode(value) or "\x00" in value:
        issues.append(
            Issue.of(line, ERROR, "bad_string", f'"{key}" contains invalid characters: {show_value(value)}')
        )
        return None
    return value


def parse_line(text: str, line: int) -> tuple[dict | None, list[Issue]]:
    """One manifest line -> (fields {audio, text, duration, dataset_id} or None, issues). Never raises."""
    issues: list[Issue] = []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [Issue.of(line, ERROR, "bad_json", f"not valid JSON: {exc.msg} at column {exc.colno}")]
    except (ValueError, RecursionError) as exc:  # e.g. integers over 4300 digits, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return None, [Issue.of(line, ERROR, "bad_json", f"not valid JSON: {reason}")]
    if not isinstance(obj, dict):
        return None, [
            Issue.of(
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
            Issue.of(line, WARNING, "unknown_key", f"unknown key {show_value(key, 40)} is ignored; {hint}")
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


@dataclass
class ParsedManifest:
    """Every line of a manifest that parsed, and what was wrong with the others."""

    path: Path  # absolute
    cwd: Path  # the current directory at parse time (the second place relative audio paths are looked for)
    entries: list[ManifestEntry] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    lines: int = 0  # non-blank lines

    def missing_audio(self, entry: ManifestEntry) -> Issue:
        """The error of an entry whose audio file is not there, naming the folders that were searched."""
        raw = show_value(entry.audio_raw)
        manifest_dir = self.path.parent
        if entry.path_rule == ABSOLUTE:
            where = ""
        elif manifest_dir == self.cwd:
            where = f" (looked in {show_value(str(self.cwd))})"
        else:
            where = (
                f" (looked in the manifest's folder {show_value(str(manifest_dir))} "
                f"and the current directory {show_value(str(self.cwd))})"
            )
        return Issue.of(entry.line, ERROR, "audio_missing", f"audio file not found: {raw}{where}")


def parse_manifest(path: str | os.PathLike) -> ParsedManifest:
    """Parse every line; only an unreadable manifest file raises ``VoxCPMError``."""
    parsed = ParsedManifest(Path(os.path.abspath(path)), Path.cwd())
    entries, issues = parsed.entries, parsed.issues
    data = _read_bytes(parsed.path)
    kind = next((what for magic, what in NOT_JSONL if data.startswith(magic)), None)
    if kind is not None:
        issues.append(Issue.of(None, ERROR, "not_jsonl", f"this is {kind}, not a UTF-8 JSONL manifest"))
        return parsed
    blank = number = 0
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            text = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append(
                Issue.of(
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
            audio, rule = resolve_audio_path(raw_audio, parsed.path.parent, parsed.cwd)
            entries.append(ManifestEntry(number, audio, raw_audio, rule, **fields))
    if not entries and not issues:
        issues.append(
            Issue.of(None, ERROR, "empty_manifest", "the manifest has no samples (every line is blank)")
        )
    parsed.lines = number - blank
    return parsed


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
    parsed = parse_manifest(path)
    errors = [i for i in parsed.issues if i.severity == ERROR]
    errors += [parsed.missing_audio(e) for e in parsed.entries if not os.path.isfile(e.audio)]
    if errors:
        errors.sort(key=lambda i: i.line or 0)
        raise VoxCPMError(_one_line_summary(Path(path), errors))
    return parsed.entries
