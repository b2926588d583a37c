"""Manifest parsing (data.manifest) and validation (data.validate) over real audio files."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wavs import espeak_clip, write_clip, write_manifest

from voxcpm_core.data.manifest import (
    ABSOLUTE,
    CWD,
    ERROR,
    MANIFEST_DIR,
    NOT_FOUND,
    WARNING,
    parse_line,
    read_manifest,
)
from voxcpm_core.data.report import LineCounts
from voxcpm_core.data.validate import validate_manifest
from voxcpm_core.errors import VoxCPMError


def _codes(report, line=None) -> dict[str, str]:
    """code -> severity for one line (or all lines)."""
    return {i.code: i.severity for i in report.issues if line is None or i.line == line}


@pytest.fixture
def clips(tmp_path) -> Path:
    """A data folder: three good 16 kHz clips under clips/."""
    for name, seconds in (("a", 1.0), ("b", 2.0), ("c", 0.5)):
        write_clip(tmp_path / "clips" / f"{name}.wav", seconds=seconds)
    return tmp_path


def test_good_manifest_has_no_issues_and_right_stats(clips):
    manifest = write_manifest(
        clips / "train.jsonl",
        [
            {"audio": "clips/a.wav", "text": "One.", "duration": 1.0},
            "",
            {"audio": "clips/b.wav", "text": "Number two.", "dataset_id": 1},
            {"audio": str(clips / "clips/c.wav"), "text": "Three!", "dataset_id": 1},
        ],
    )
    report = validate_manifest(manifest, sample_rate=16000)
    assert report.ok and report.issues == []
    assert [e.line for e in report.entries] == [1, 3, 4]
    assert [e.path_rule for e in report.entries] == [MANIFEST_DIR, MANIFEST_DIR, ABSOLUTE]
    assert report.entries[0].audio == clips / "clips/a.wav"
    assert report.entries[0].duration == 1.0 and report.entries[0].dataset_id == 0
    stats = report.stats
    assert stats.lines == LineCounts(total=3, ok=3, with_errors=0, with_warnings=0)
    assert stats.total_hours == pytest.approx(3.5 / 3600)
    assert stats.duration_s.min == pytest.approx(0.5) and stats.duration_s.max == pytest.approx(2.0)
    assert stats.duration_s.median == pytest.approx(1.0)
    assert stats.text_chars.max == len("Number two.")
    assert stats.dataset_ids == {0: 1, 1: 2}
    assert stats.sample_rates == {16000: 3} and stats.formats == {"WAV": 3}
    as_json = report.to_dict()["stats"]  # --json: counted values as string keys, no p95 of text lengths
    assert as_json["dataset_ids"] == {"0": 1, "1": 2} and "p95" not in as_json["text_chars"]
    assert read_manifest(manifest) == report.entries


def test_relative_paths_try_the_manifest_folder_then_cwd(tmp_path, monkeypatch):
    data, work = tmp_path / "data", tmp_path / "work"
    write_clip(data / "both.wav", seconds=1.0)
    write_clip(work / "both.wav", seconds=2.0)
    write_clip(work / "cwd_only.wav")
    manifest = write_manifest(
        data / "m.jsonl",
        [
            {"audio": "both.wav", "text": "a"},
            {"audio": "cwd_only.wav", "text": "b"},
            {"audio": "nowhere.wav", "text": "c"},
        ],
    )
    monkeypatch.chdir(work)
    report = validate_manifest(manifest)
    rules = {e.line: (e.path_rule, e.audio) for e in report.entries}
    assert rules[1] == (MANIFEST_DIR, data / "both.wav")
    assert rules[2] == (CWD, work / "cwd_only.wav")
    assert rules[3][0] == NOT_FOUND
    assert report.stats.path_rules == {MANIFEST_DIR: 1, CWD: 1, NOT_FOUND: 1}
    missing = [i for i in report.issues if i.line == 3]
    assert [(i.code, i.severity) for i in missing] == [("audio_missing", ERROR)]
    assert str(data) in missing[0].message and str(work) in missing[0].message
    assert report.stats.duration_s.max == pytest.approx(1.0)  # the manifest folder's copy won


@pytest.mark.parametrize(
    "line, code",
    [
        ("{bad json", "bad_json"),
        ('{"audio": "clips/a.wav", "text": "x"', "bad_json"),
        ("[1, 2]", "not_object"),
        ('"just a string"', "not_object"),
        ("null", "not_object"),
        ('{"text": "no audio"}', "missing_field"),
        ('{"audio": "clips/a.wav"}', "missing_field"),
        ('{"audio": 3, "text": "x"}', "wrong_type"),
        ('{"audio": ["clips/a.wav"], "text": "x"}', "wrong_type"),
        ('{"audio": "clips/a.wav", "text": 5}', "wrong_type"),
        ('{"audio": "clips/a.wav", "text": "   "}', "empty_field"),
        ('{"audio": "", "text": "x"}', "empty_field"),
        ('{"audio": "clips/a\\u0000.wav", "text": "x"}', "bad_string"),
        ('{"audio": "clips/a.wav", "text": "\\ud800"}', "bad_string"),
        ('{"audio": "clips/a.wav", "text": "x", "duration": "3.5"}', "wrong_type"),
        ('{"audio": "clips/a.wav", "text": "x", "duration": 0}', "bad_duration"),
        ('{"audio": "clips/a.wav", "text": "x", "duration": NaN}', "bad_duration"),
        ('{"audio": "clips/a.wav", "text": "x", "duration": 1e999}', "bad_duration"),
        ('{"audio": "clips/a.wav", "text": "x", "dataset_id": -1}', "bad_dataset_id"),
        ('{"audio": "clips/a.wav", "text": "x", "dataset_id": 1.5}', "bad_dataset_id"),
        ('{"audio": "clips/a.wav", "text": "x", "dataset_id": true}', "bad_dataset_id"),
        ('{"audio": "clips/missing.wav", "text": "x"}', "audio_missing"),
        ('{"audio": "clips", "text": "x"}', "audio_not_file"),
    ],
)
def test_each_broken_line_is_an_error_on_its_line(clips, line, code):
    manifest = write_manifest(clips / "m.jsonl", [{"audio": "clips/a.wav", "text": "fine"}, line])
    report = validate_manifest(manifest)
    assert not report.ok
    assert _codes(report, 1) == {}
    assert _codes(report, 2).get(code) == ERROR
    assert report.stats.lines == LineCounts(total=2, ok=1, with_errors=1, with_warnings=0)


def test_null_optional_fields_mean_absent(clips):
    manifest = write_manifest(
        clips / "m.jsonl", [{"audio": "clips/a.wav", "text": "x", "duration": None, "dataset_id": None}]
    )
    report = validate_manifest(manifest)
    assert report.ok and report.entries[0].duration is None and report.entries[0].dataset_id == 0


def test_empty_and_corrupt_audio_files(clips):
    (clips / "clips/empty.wav").write_bytes(b"")
    (clips / "clips/corrupt.wav").write_bytes(os.urandom(4096))
    write_clip(clips / "clips/zero.wav", seconds=0.0)
    manifest = write_manifest(
        clips / "m.jsonl",
        [{"audio": f"clips/{name}.wav", "text": "x"} for name in ("empty", "corrupt", "zero")],
    )
    report = validate_manifest(manifest)
    assert _codes(report, 1) == {"audio_empty": ERROR}
    assert _codes(report, 2) == {"audio_unreadable": ERROR}
    assert _codes(report, 3) == {"audio_empty": ERROR}
    assert report.stats.lines.with_errors == 3


@pytest.mark.parametrize(
    "model_sr, file_sr", [(16000, 22050), (16000, 48000), (44100, 48000), (44100, 22050)]
)
def test_sample_rate_mismatch_warns_and_strict_makes_it_an_error(tmp_path, model_sr, file_sr):
    write_clip(tmp_path / "x.wav", sample_rate=file_sr)
    write_clip(tmp_path / "ok.wav", sample_rate=model_sr)
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "a"}, {"audio": "ok.wav", "text": "b"}]
    )
    relaxed = validate_manifest(manifest, sample_rate=model_sr)
    assert relaxed.ok and _codes(relaxed, 1) == {"sample_rate": WARNING} and _codes(relaxed, 2) == {}
    assert str(file_sr) in relaxed.issues[0].message and str(model_sr) in relaxed.issues[0].message
    strict = validate_manifest(manifest, sample_rate=model_sr, strict=True)
    assert not strict.ok and _codes(strict, 1) == {"sample_rate": ERROR}
    assert _codes(validate_manifest(manifest)) == {}  # no model rate given: nothing to compare


def test_header_warnings(tmp_path):
    write_clip(tmp_path / "stereo.wav", channels=2)
    write_clip(tmp_path / "short.wav", seconds=0.2)
    write_clip(tmp_path / "long.wav", seconds=31.0, sample_rate=8000)
    write_clip(tmp_path / "clip.flac", seconds=1.0)
    write_clip(tmp_path / "ok.wav", seconds=1.0)
    rows = [
        {"audio": "stereo.wav", "text": "a"},
        {"audio": "short.wav", "text": "b"},
        {"audio": "long.wav", "text": "c"},
        {"audio": "clip.flac", "text": "d"},
        {"audio": "ok.wav", "text": "e", "duration": 1.25},
        {"audio": "ok.wav", "text": "f", "duration": 1.05},
    ]
    report = validate_manifest(write_manifest(tmp_path / "m.jsonl", rows))
    assert report.ok
    assert _codes(report, 1) == {"multichannel": WARNING}
    assert _codes(report, 2) == {"too_short": WARNING}
    assert _codes(report, 3) == {"too_long": WARNING}
    assert _codes(report, 4) == {"not_wav": WARNING}
    assert _codes(report, 5) == {"duration_mismatch": WARNING}
    assert _codes(report, 6) == {"duplicate_audio": WARNING}  # 0.05 s off is within tolerance
    assert report.stats.channels == {1: 5, 2: 1} and report.stats.formats == {"WAV": 5, "FLAC": 1}


@pytest.mark.parametrize("block", [1 << 20, 1000])  # whole file in one block, or many blocks
def test_deep_decoding_finds_nan_clipping_and_silence(tmp_path, monkeypatch, block):
    monkeypatch.setattr("voxcpm_core.data.validate.DECODE_BLOCK", block)
    wav = np.full(16000, 0.1, dtype=np.float32)
    wav[100:110] = np.nan
    sf.write(tmp_path / "nan.wav", wav, 16000, subtype="FLOAT")
    write_clip(tmp_path / "loud.wav", amplitude=2.0)
    write_clip(tmp_path / "silent.wav", amplitude=0.0)
    write_clip(tmp_path / "ok.wav")
    names = ("nan", "loud", "silent", "ok")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": f"{n}.wav", "text": n} for n in names])
    assert validate_manifest(manifest).ok and validate_manifest(manifest).issues == []
    deep = validate_manifest(manifest, deep=True)
    assert _codes(deep, 1) == {"non_finite": ERROR} and "10 samples" in deep.issues[0].message
    assert _codes(deep, 2) == {"clipping": WARNING}
    assert _codes(deep, 3) == {"silence": WARNING}
    assert _codes(deep, 4) == {}


def test_duplicates(clips):
    rows = [
        {"audio": "clips/a.wav", "text": "same"},
        {"audio": "clips/b.wav", "text": "other"},
        {"audio": "clips/./a.wav", "text": "same"},
        {"audio": str(clips / "clips/a.wav"), "text": "different text"},
    ]
    report = validate_manifest(write_manifest(clips / "m.jsonl", rows))
    assert report.ok
    assert _codes(report, 3) == {"duplicate_pair": WARNING} and "line 1" in report.issues[0].message
    assert _codes(report, 4) == {"duplicate_audio": WARNING}
    assert _codes(report, 1) == {} and _codes(report, 2) == {}


def test_unknown_keys_warn_with_did_you_mean(clips):
    rows = [
        {"audo": "clips/a.wav", "text": "x"},
        {"audio": "clips/a.wav", "txet": "x"},
        {"audio": "clips/b.wav", "text": "x", "durration": 2.0},
        {"audio": "clips/c.wav", "text": "x", "speaker": "bob"},
    ]
    report = validate_manifest(write_manifest(clips / "m.jsonl", rows))
    by_line = {line: [i for i in report.issues if i.line == line] for line in (1, 2, 3, 4)}
    assert [(i.code, i.severity) for i in by_line[1]] == [("missing_field", ERROR)]
    assert '"audo"' in by_line[1][0].message and 'rename it to "audio"' in by_line[1][0].message
    assert [i.code for i in by_line[2]] == ["missing_field"] and '"txet"' in by_line[2][0].message
    assert [(i.code, i.severity) for i in by_line[3]] == [("unknown_key", WARNING)]
    assert 'did you mean "duration"?' in by_line[3][0].message
    assert [i.code for i in by_line[4]] == ["unknown_key"] and "known keys" in by_line[4][0].message


def test_encoding_details_and_line_numbers(clips):
    good = json.dumps({"audio": "clips/a.wav", "text": "héllo"}).encode()
    (clips / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n  \n" + b'{"audio": "\xff"}\n' + good)
    report = validate_manifest(clips / "m.jsonl")
    assert [e.line for e in report.entries] == [1, 5]
    assert report.entries[0].text == "héllo"
    assert _codes(report, 4) == {"not_utf8": ERROR}
    assert _codes(report, 5) == {"duplicate_pair": WARNING}
    assert report.stats.lines.total == 3


def test_empty_and_missing_manifests(tmp_path):
    empty = write_manifest(tmp_path / "empty.jsonl", ["", "   "])
    report = validate_manifest(empty)
    assert not report.ok and [(i.line, i.code) for i in report.issues] == [(None, "empty_manifest")]
    with pytest.raises(VoxCPMError, match="manifest not found"):
        validate_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(VoxCPMError, match="directory"):
        validate_manifest(tmp_path)
    for path, kind in (
        (write_clip(tmp_path / "clip.wav"), "a WAV file"),
        (tmp_path / "u16.jsonl", "UTF-16 text"),
    ):
        if kind == "UTF-16 text":
            path.write_text('{"audio": "clip.wav", "text": "x"}\n', encoding="utf-16")
        report = validate_manifest(path)  # a file passed by mistake: one error, not one per "line"
        assert [(i.line, i.code) for i in report.errors] == [(None, "not_jsonl")] and kind in report.errors[
            0
        ].message


def test_read_manifest_raises_one_line_naming_the_bad_lines(clips):
    rows = [{"audio": "clips/a.wav", "text": "ok"}, "{oops", {"audio": "clips/gone.wav", "text": "x"}]
    rows += [{"text": f"no audio {i}"} for i in range(6)]
    with pytest.raises(VoxCPMError) as err:
        read_manifest(write_manifest(clips / "m.jsonl", rows))
    message = str(err.value)
    assert "\n" not in message
    assert "8 bad line(s)" in message and "line 2: not valid JSON" in message
    assert "line 3: audio file not found" in message and "and 3 more" in message


class _WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def test_sequence_lengths_and_max_batch_tokens(tmp_path):
    write_clip(tmp_path / "a.wav", seconds=1.0)  # 16000 samples -> ceil(12.5) = 13 patches
    write_clip(tmp_path / "b.wav", seconds=1.0, sample_rate=22050)  # -> 16000 samples at 16 kHz
    write_clip(tmp_path / "c.wav", seconds=0.5, sample_rate=48000)  # -> 8000 -> ceil(6.25) = 7
    rows = [
        {"audio": "a.wav", "text": "one two three"},
        {"audio": "b.wav", "text": "one"},
        {"audio": "c.wav", "text": "one two"},
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    expected = [3 + 1 + 13 + 1, 1 + 1 + 13 + 1, 2 + 1 + 7 + 1]
    kwargs = dict(sample_rate=16000, tokenizer=_WordTokenizer(), patch_samples=1280)
    seq = validate_manifest(manifest, **kwargs).stats.sequence
    tokens = seq.tokens
    assert (tokens.min, tokens.max, tokens.median) == (min(expected), max(expected), sorted(expected)[1])

    report = validate_manifest(manifest, max_batch_tokens=17, batch_size=2, **kwargs)
    assert report.ok
    assert [i.line for i in report.issues if i.code == "over_max_batch_tokens"] == [1]
    seq = report.stats.sequence
    assert seq.over_max_batch_tokens == 1
    assert seq.per_sample_budget == 8 and seq.over_per_sample_budget == 3
    with pytest.raises(VoxCPMError, match="tokenizer"):
        validate_manifest(manifest, sample_rate=16000, max_batch_tokens=100)


def test_thread_count_does_not_change_the_report(clips):
    rows = [{"audio": f"clips/{n}.wav", "text": f"t{i}"} for i, n in enumerate("abcabcxx")]
    manifest = write_manifest(clips / "m.jsonl", rows)
    one, many = validate_manifest(manifest, workers=1), validate_manifest(manifest, workers=6)
    assert one.issues == many.issues and one.stats == many.stats and one.entries == many.entries


def test_espeak_speech_manifest(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "Data checks save training time."]
    paths = [espeak_clip(tmp_path / f"s{i}.wav", t) for i, t in enumerate(texts)]
    if None in paths:
        pytest.skip("espeak-ng not installed")
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"audio": p.name, "text": t} for p, t in zip(paths, texts, strict=True)]
    )
    assert validate_manifest(manifest, sample_rate=22050, deep=True).issues == []
    report = validate_manifest(manifest, sample_rate=16000)
    assert (
        report.ok and set(_codes(report).values()) == {WARNING} and _codes(report) == {"sample_rate": WARNING}
    )
    assert 1.0 < report.stats.duration_s.min < 10.0


# ----------------------------------------------------------------------------- fuzzing

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_keys = st.sampled_from(
    ["audio", "text", "duration", "dataset_id", "audo", "txt", "", "\x00", "speaker"]
) | st.text(max_size=8)
_paths = st.sampled_from(
    ["a.wav", "./a.wav", "a.wav/", "missing.wav", ".", "/", "~", "\x00", "a" * 5000, "/dev/null"]
)
_objects = st.dictionaries(_keys, _json_values | _paths, max_size=5)
_lines = st.one_of(
    st.text(max_size=60),
    _objects.map(json.dumps),
    st.builds(
        lambda audio, text: json.dumps({"audio": audio, "text": text}),
        _paths | st.text(max_size=10),
        st.text(max_size=10),
    ),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_lines, max_size=6))
def test_fuzz_no_line_content_escapes_as_an_exception(lines):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_clip(folder / "a.wav", seconds=0.1)
        manifest = folder / "m.jsonl"
        manifest.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        report = validate_manifest(
            manifest, sample_rate=16000, tokenizer=_WordTokenizer(), patch_samples=1280, workers=2
        )
        json.dumps(report.to_dict())  # always serialisable
        for issue in report.issues:
            issue.message.encode("utf-8")  # always printable
        written = manifest.read_bytes().split(b"\n")
        nonblank = [n for n, raw in enumerate(written, 1) if raw.decode("utf-8", "replace").strip()]
        parsed = {e.line for e in report.entries}
        errored = {i.line for i in report.issues if i.severity == ERROR}
        if None not in errored:  # unless the whole file is rejected (e.g. it starts like a WAV file)
            for n in nonblank:  # every non-blank line is an entry or carries an error
                assert n in parsed or n in errored


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_fuzz_parse_line_never_raises(text):
    fields, issues = parse_line(text, 7)
    assert all(i.line == 7 for i in issues)
    assert (fields is None) == any(i.severity == ERROR for i in issues)
    if fields is not None:
        assert isinstance(fields["audio"], str) and fields["text"].strip()
        assert fields["duration"] is None or (math.isfinite(fields["duration"]) and fields["duration"] > 0)
