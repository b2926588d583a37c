"""The benches keep working with their documented options: each runs on a tiny official model and prints
one JSON object whose figures sit beside the machine limits and the goals of issue 6 (and issue 12's for
VoxCPM2 generation)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import official_dir

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture
def tiny() -> Path:
    return official_dir("v15-tiny") / "base"


def test_train_bench_reports_steps_beside_the_matmul_peak(tiny):
    out = _bench("train.py", "--config", str(tiny / "config.json"), "--runs", "lora", "full",
                 "--steps", "1", "--warmup", "1", "--machine-seconds", "0.01", "--threads", "1")
    assert out["machine"]["summary"]["matmul_gflops_float32"] > 0 and out["machine"]["device"] == "cpu"
    runs = {run["run"]: run for run in out["runs"]}
    assert set(runs) == {"lora", "full"}
    for run in runs.values():
        assert run["median_fwd_bwd_s"] > 0 and run["peak_rss_gib"] > 0 and run["peak_gpu_memory_gib"] is None
        assert run["tokens_per_s"] * run["median_step_s"] == pytest.approx(run["batch"]["B"] * run["batch"]["seq_len"])
        assert 0 < run["fraction_of_matmul_peak"] == pytest.approx(run["fwd_bwd_gflops"] / run["machine_matmul_peak_gflops"])
        assert all(isinstance(goal["met"], bool) for goal in run["goals"])
    assert runs["lora"]["trainable_params"] < runs["full"]["trainable_params"] == runs["full"]["total_params"]


def test_infer_bench_reports_patches_beside_the_stream_limit(tiny):
    out = _bench("infer.py", "--model-dir", str(tiny), "--seconds", "0.3", "--timesteps", "3",
                 "--machine-seconds", "0.01", "--threads", "1")
    assert out["packed_weights"] is True and out["device"] == "cpu"
    for dtype in ("float32", "bfloat16"):
        run = out["runs"][dtype]
        assert run["finite_audio"] and run["patches"] >= 2
        assert run["fraction_of_stream_limit"] == pytest.approx(run["achieved_gbs"] / run["machine_stream_gbs"], abs=1e-3)  # rounded
    assert out["bfloat16_vs_float32"]["latents_rel_l2"] < 0.5  # bf16 rounding, not a different generation


def test_infer_bench_runs_voxcpm2_at_its_output_rate_beside_the_voxcpm2_reference():
    v2 = official_dir("v2-tiny") / "base"
    config = json.loads((v2 / "config.json").read_text())
    out = _bench("infer.py", "--model-dir", str(v2), "--seconds", "0.3", "--timesteps", "3",
                 "--machine-seconds", "0.01", "--threads", "1")
    assert out["architecture"] == "voxcpm2" and out["tokenizer_dir"] == str(v2)
    assert (out["sample_rate"], out["out_sample_rate"]) == (16000, 48000)
    out_patch_samples = config["patch_size"] * math.prod(config["audio_vae_config"]["decoder_rates"])
    for dtype in ("float32", "bfloat16"):
        run = out["runs"][dtype]
        assert run["finite_audio"] and run["patches"] >= 2
        # seconds at the 48 kHz output; at the 16 kHz encoder rate they would read 3x longer
        assert run["audio_seconds"] == pytest.approx(run["patches"] * out_patch_samples / 48000)
        assert run["rtf_total"] == pytest.approx(run["total_s"] / run["audio_seconds"], rel=1e-2)  # rounded
        assert run["s_per_patch_median"] > 0 and run["time_to_first_audio_s"] > 0 and run["machine_stream_gbs"] > 0
        assert 0 < run["peak_rss_generate_gib"] <= run["peak_rss_gib"]
        # the VoxCPM2 reference in the same dtype, never VoxCPM1.5's figures
        reference = out[f"reference_{dtype}"]
        assert reference["source"]["file"].endswith("refperf_voxcpm2_cpu2t.json")
        against_reference = {g["figure"]: g for g in run["goals"] if g["of"] == "reference"}
        assert set(against_reference) == {"s_per_patch_median", "peak_rss_generate_gib"}
        assert against_reference["peak_rss_generate_gib"]["at_most"] == reference["peak_rss_generate_gib"]
        assert all(goal["met"] == (goal["value"] <= goal["at_most"]) for goal in run["goals"])


def test_a_model_dir_without_tokenizer_files_borrows_voxcpm15s(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from measure import FALLBACK_TOKENIZER_DIR, tokenizer_dir

    v2 = official_dir("v2-tiny") / "base"
    (tmp_path / "config.json").write_bytes((v2 / "config.json").read_bytes())  # as ../shared/models/VoxCPM2
    assert tokenizer_dir(v2) == v2
    assert tokenizer_dir(tmp_path) == FALLBACK_TOKENIZER_DIR and (FALLBACK_TOKENIZER_DIR / "tokenizer.json").is_file()


def test_data_bench_reports_clips_beside_the_matmul_peak(tiny):
    out = _bench("data.py", "--config", str(tiny / "config.json"), "--clips", "2", "--seconds", "0.5",
                 "--batch-clips", "1", "2", "--machine-seconds", "0.01", "--threads", "1")
    assert out["encode_gflop_per_clip"] > 0 and out["device"] == "cpu"
    assert {b["batch_clips"] for b in out["builds"]} == {1, 2}
    for build in out["builds"]:
        assert build["clips_per_s"] > 0 and build["fraction_of_matmul_peak"] > 0
