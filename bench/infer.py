"""Generation speed at the real VoxCPM1.5 size (random weights, CPU): prints one JSON object.

    python bench/infer.py [--threads 2] [--seconds 3] [--timesteps 10] [--dtypes float32 bfloat16]

Per dtype: seconds per generated patch of the AR loop (prefill included), VAE decode time, real-time
factor of the whole non-streaming generation, and time to first audio of a streaming generation.
The stop head of random weights is meaningless, so min_len = max_len = the patches of ``--seconds``.
The reference implementation's timings (same machine kind, float32, 2 threads) are shown beside.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from voxcpm_core import inference
from voxcpm_core.checkpoint import load_tokenizer, read_model_config
from voxcpm_core.models.audio_vae import AudioVAE
from voxcpm_core.models.voxcpm import VoxCPMModel

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model, vae, tokenizer, patches: int, timesteps: int) -> dict:
    cfg = model.config
    opts = inference.SamplingOptions(
        inference_timesteps=timesteps, min_len=patches, max_len=patches, retry_badcase=False
    )
    inputs = inference.prepare_inputs(tokenizer, TEXT, None, cfg.patch_size, cfg.feat_dim)
    assert inference.max_patches(inputs.target_tokens, patches) == patches, "text too short for --seconds"

    start = time.perf_counter()  # time to first audio: prefill, one patch, its decode
    first = next(inference.generate_streaming(model, vae, tokenizer, TEXT, None, opts, seed=0))
    ttfa = time.perf_counter() - start

    start = time.perf_counter()  # the steps of inference.generate, timed one by one
    inputs = inference.prepare_inputs(tokenizer, TEXT, None, cfg.patch_size, cfg.feat_dim)
    steps, stamps = [], [start]
    for step in inference.decode_steps(model, inputs, opts, patches, torch.Generator().manual_seed(0)):
        steps.append(step)
        stamps.append(time.perf_counter())
    ar_s = stamps[-1] - start
    per_patch = sorted(b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True))  # after the first (prefill) patch
    wav = inference.decode_patches(vae, torch.stack([s.patch for s in steps]))
    total_s = time.perf_counter() - start
    audio_s = len(wav) / vae.sample_rate
    return {
        "text_tokens": inputs.target_tokens,
        "patches": len(steps),
        "audio_seconds": round(audio_s, 3),
        "first_chunk_samples": len(first),
        "time_to_first_audio_s": round(ttfa, 3),
        "ar_loop_s": round(ar_s, 3),
        "s_per_patch_ar": round(ar_s / len(steps), 4),
        "s_per_patch_median": round(per_patch[len(per_patch) // 2], 4),  # robust to other load on the cores
        "s_per_patch_min": round(per_patch[0], 4),
        "decode_s": round(total_s - ar_s, 3),
        "total_s": round(total_s, 3),
        "rtf_total": round(total_s / audio_s, 3),
        "finite_audio": bool(torch.isfinite(wav).all()),
        "load_average_1min_after": round(os.getloadavg()[0], 2),  # other processes on the cores skew timings
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=SHARED / "models" / "VoxCPM1.5", help="config + tokenizer")
    parser.add_argument("--reference", type=Path, default=SHARED / "fixtures" / "official" / "refperf_voxcpm15_cpu2t.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)

    config = read_model_config(args.model_dir)
    tokenizer = load_tokenizer(args.model_dir)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = VoxCPMModel(config).eval()
    vae = AudioVAE(config.audio_vae_config).eval()
    build_s = time.perf_counter() - start
    patches = round(args.seconds * config.sample_rate / config.patch_samples)

    runs = {}
    for name in args.dtypes:
        model.to(getattr(torch, name))
        measure(model, vae, tokenizer, 2, args.timesteps)  # warm-up
        runs[name] = measure(model, vae, tokenizer, patches, args.timesteps)

    result = {
        "model": str(args.model_dir / "config.json"),
        "params_no_vae": sum(p.numel() for p in model.parameters()),
        "params_vae": sum(p.numel() for p in vae.parameters()),
        "threads": args.threads,
        "load_average_1min_before": load_before,
        "inference_timesteps": args.timesteps,
        "build_s": round(build_s, 2),
        "runs": runs,
    }
    if args.reference.is_file():
        ref = next(r for r in json.loads(args.reference.read_text())["runs"] if r["mode"] == "generate")
        result["reference_float32"] = {k: ref[k] for k in ("patches", "s_per_patch_ar", "decode_s", "total_s", "rtf_total")}
        if "float32" in runs:
            result["speedup_vs_reference_float32"] = {
                "s_per_patch_ar": round(ref["s_per_patch_ar"] / runs["float32"]["s_per_patch_ar"], 2),
                "rtf_total": round(ref["rtf_total"] / runs["float32"]["rtf_total"], 2),
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
