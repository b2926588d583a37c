"""`voxcpm data validate` as a user runs it: verdicts, line numbers, exit codes, --json, --model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import soundfile as sf
from conftest import REPO, official_dir
from typer.testing import CliRunner
from wavs import espeak_clip, write_clip, write_manifest

from voxcpm_cli.main import app
from voxcpm_core.errors import VoxCPMError

runner = CliRunner()


def _validate(*args: str):
    return runner.invoke(app, ["data", "validate", *map(str, args)], env={"COLUMNS": "200"})


def _table_lines(output: str) -> list[int]:
    """Line numbers in the problems table (first column)."""
    return [int(m) for m in re.findall(r"^│\s+(\d+) │ (?:error|warning)", output, flags=re.M)]


@pytest.fixture
def data(tmp_path):
    write_clip(tmp_path / "wavs/a.wav", seconds=1.0)
    write_clip(tmp_path / "wavs/b.wav", seconds=1.6)
    return tmp_path


def test_good_manifest_exits_0(data):
    manifest = write_manifest(
        data / "train.jsonl", [{"audio": "wavs/a.wav", "text": "A."}, {"audio": "wavs/b.wav", "text": "B."}]
    )
    result = _validate(manifest, "--sample-rate", "16000")
    assert result.exit_code == 0, result.output
    assert "OK: 2 lines, no errors" in result.output
    assert "problems" not in result.output


def test_broken_manifest_exits_1_naming_each_line(data):
    (data / "wavs/corrupt.wav").write_bytes(b"RIFF" + bytes(100))
    (data / "wavs/empty.wav").write_bytes(b"")
    write_clip(data / "wavs/stereo.wav", channels=2)
    rows = [
        {"audio": "wavs/a.wav", "text": "fine"},
        "{not json",
        {"audio": "wavs/a.wav"},
        {"audio": "wavs/gone.wav", "text": "x"},
        {"audio": "wavs/empty.wav", "text": "x"},
        {"audio": "wavs/corrupt.wav", "text": "x"},
        {"audio": "wavs/stereo.wav", "text": "x"},
        {"audio": "wavs/b.wav", "text": 12},
    ]
    result = _validate(write_manifest(data / "m.jsonl", rows), "--sample-rate", "16000")
    assert result.exit_code == 1
    assert _table_lines(result.output) == [2, 3, 4, 5, 6, 7, 8]
    for text in (
        "bad_json",
        "missing_field",
        "audio_missing",
        "audio_empty",
        "audio_unreadable",
        "multichannel",
    ):
        assert text in result.output
    assert "FAILED: 6 of 8 lines have errors" in result.output


def test_json_output_has_the_same_facts(data):
    rows = [
        {"audio": "wavs/a.wav", "text": "x"},
        {"audio": "wavs/a.wav", "text": "x"},
        {"audio": "wavs/nope.wav", "text": "y"},
    ]
    result = _validate(write_manifest(data / "m.jsonl", rows), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["errors"] == 1 and report["warnings"] == 1
    assert [(i["line"], i["severity"], i["code"]) for i in report["issues"]] == [
        (2, "warning", "duplicate_pair"),
        (3, "error", "audio_missing"),
    ]
    assert report["stats"]["lines"] == {"total": 3, "ok": 1, "with_errors": 1, "with_warnings": 1}
    assert report["stats"]["duration_s"]["max"] == pytest.approx(1.0)


def test_only_the_first_50_problems_are_listed(data):
    rows = [{"audio": f"wavs/missing{i}.wav", "text": "x"} for i in range(57)]
    rows.insert(0, {"audio": "wavs/a.wav", "text": "x", "speaker": "s"})  # a warning on line 1
    result = _validate(write_manifest(data / "m.jsonl", rows))
    assert result.exit_code == 1
    assert _table_lines(result.output) == list(range(2, 52))  # errors take the places first
    assert "... and 8 more problems" in result.output
    assert len(json.loads(_validate(data / "m.jsonl", "--json").stdout)["issues"]) == 58


@pytest.mark.parametrize("model_sr, file_sr", [(16000, 22050), (16000, 48000), (44100, 48000)])
def test_sample_rate_mismatch_warns_and_fails_with_strict(tmp_path, model_sr, file_sr):
    write_clip(tmp_path / "x.wav", sample_rate=file_sr)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "x"}])
    relaxed = _validate(manifest, "--sample-rate", model_sr)
    assert relaxed.exit_code == 0 and f"{file_sr} Hz, the model uses {model_sr} Hz" in relaxed.output
    strict = _validate(manifest, "--sample-rate", model_sr, "--strict")
    assert strict.exit_code == 1 and "sample_rate" in strict.output


def test_deep_flag_decodes(tmp_path):
    write_clip(tmp_path / "silent.wav", amplitude=0.0)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "silent.wav", "text": "x"}])
    assert "silence" not in _validate(manifest).output
    deep = _validate(manifest, "--deep")
    assert deep.exit_code == 0 and "silence" in deep.output


def test_model_dir_gives_rate_tokenizer_and_sequence_lengths(tmp_path):
    from voxcpm_core.io.checkpoint import load_tokenizer, read_model_config

    model = official_dir("v1-tiny") / "base"
    config, tokenizer = read_model_config(model), load_tokenizer(model)
    texts = ["Hello world, this is a test.", "Short one."]
    write_clip(tmp_path / "a.wav", seconds=2.0, sample_rate=config.sample_rate)
    write_clip(tmp_path / "b.wav", seconds=1.0, sample_rate=22050)
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"audio": "a.wav", "text": texts[0]}, {"audio": "b.wav", "text": texts[1]}]
    )

    samples = [2 * config.sample_rate, config.sample_rate]  # at the model rate
    expected = [
        len(tokenizer.encode(t)) + 1 + math.ceil(n / config.patch_samples) + 1
        for t, n in zip(texts, samples, strict=True)
    ]
    result = _validate(manifest, "--model", model, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stats"]["options"]["sample_rate"] == config.sample_rate
    assert report["stats"]["sequence"]["max"] == max(expected) and report["stats"]["sequence"]["min"] == min(
        expected
    )
    assert [(i["line"], i["code"]) for i in report["issues"]] == [(2, "sample_rate")]

    limit = min(expected)  # the longer sample goes over
    capped = json.loads(
        _validate(manifest, "--model", model, "--max-batch-tokens", limit, "--batch-size", 2, "--json").stdout
    )
    assert capped["stats"]["sequence"]["over_max_batch_tokens"] == 1
    assert capped["stats"]["sequence"]["over_per_sample_budget"] == 2
    text = _validate(manifest, "--model", model, "--max-batch-tokens", limit)
    assert text.exit_code == 0 and "over max_batch_tokens" in text.output
    assert _validate(manifest, "--model", model, "--strict").exit_code == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "m", "--sample-rate", "16000"],
        ["--max-batch-tokens", "100"],
        ["--batch-size", "4"],
        ["--workers", "0"],
        ["--sample-rate", "-5"],
        ["--sample-rate", "lots"],
    ],
)
def test_usage_errors_exit_2(data, args):
    manifest = write_manifest(data / "m.jsonl", [{"audio": "wavs/a.wav", "text": "x"}])
    result = _validate(manifest, *args)
    assert result.exit_code == 2, result.output


def test_missing_argument_is_a_usage_error():
    assert runner.invoke(app, ["data", "validate"]).exit_code == 2


def test_bad_model_dir_is_an_expected_error(data):
    manifest = write_manifest(data / "m.jsonl", [{"audio": "wavs/a.wav", "text": "x"}])
    result = _validate(manifest, "--model", data / "no-model")
    assert result.exit_code == 1 and isinstance(result.exception, VoxCPMError)


def test_espeak_manifest_passes(tmp_path):
    clip = espeak_clip(tmp_path / "speech.wav", "A real sentence for the data check.")
    if clip is None:
        pytest.skip("espeak-ng not installed")
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"audio": "speech.wav", "text": "A real sentence for the data check."}]
    )
    result = _validate(manifest, "--sample-rate", sf.info(clip).samplerate, "--deep")
    assert result.exit_code == 0 and "OK: 1 lines, no errors" in result.output


def _voxcpm(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "voxcpm_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": "", "COLUMNS": "120"},
    )


def test_real_process_missing_manifest_is_one_red_line(tmp_path):
    proc = _voxcpm("data", "validate", "nope.jsonl", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "nope.jsonl: manifest not found" in proc.stderr and "Traceback" not in proc.stderr
    usage = _voxcpm(
        "data", "validate", "nope.jsonl", "--model", str(REPO), "--sample-rate", "1", cwd=tmp_path
    )
    assert usage.returncode == 2 and "not both" in usage.stderr and "Traceback" not in usage.stderr
