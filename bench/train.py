"""Seconds per optimizer step and peak RSS of fine-tuning at the real VoxCPM1.5 size; prints one JSON object.

    python bench/train.py [--modes lora full] [--steps 3] [--threads 2] [--config ../shared/models/VoxCPM1.5/config.json]

Random weights (the model is built from config.json, nothing is read or written on disk), CPU float32,
a fixed batch of 2 samples of 30 text tokens + 5.12 s of audio given as latents (no VAE), the trainer's
own loss, clipping, fused AdamW and in-place zero_grad. optim_s includes zero_grad. LoRA: r 32, alpha 64, LM + DiT q/k/v/o. Each mode runs in its own process
so its peak RSS is its own. Compared with the reference's timings in refperf_voxcpm15_cpu2t.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_CONFIG = SHARED / "models" / "VoxCPM1.5" / "config.json"
REFERENCE = SHARED / "fixtures" / "official" / "refperf_voxcpm15_cpu2t.json"
TEXT_TOKENS, AUDIO_SECONDS, BATCH = 30, 5.12, 2


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_mode(mode: str, config_path: Path, steps: int, threads: int) -> dict:
    from voxcpm_core.config import parse_model_config
    from voxcpm_core.data.batch import collate
    from voxcpm_core.lora import LoRAConfig, apply_lora
    from voxcpm_core.models.voxcpm import VoxCPMModel
    from voxcpm_core.training.config import LossWeights
    from voxcpm_core.training.optim import build_optimizer, select_trainable
    from voxcpm_core.training.trainer import patch_sums, sample_draws, weighted_loss_sum

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = parse_model_config(json.loads(config_path.read_text()), source=str(config_path))
    start = time.perf_counter()
    model = VoxCPMModel(config).float()
    lora = None
    if mode == "lora":
        lora = LoRAConfig(enable_lm=True, enable_dit=True, r=32, alpha=64)
        apply_lora(model, lora)
    model.train()
    trainable = select_trainable(model, lora=mode == "lora")
    optimizer = build_optimizer(trainable, 1e-5, 0.01)
    build_s = time.perf_counter() - start
    rss_after_build = _peak_rss_gib()

    patches = round(AUDIO_SECONDS * config.sample_rate / config.patch_samples)  # 32 at 6.25 Hz
    gen = torch.Generator().manual_seed(0)
    samples = [
        (torch.randint(113, min(20000, config.lm_config.vocab_size), (TEXT_TOKENS,), generator=gen).tolist(),
         torch.randn(patches, config.patch_size, config.feat_dim, generator=gen), 0)
        for _ in range(BATCH)
    ]
    batch = collate(samples)
    lambdas, params = LossWeights(), [p for _, p in trainable]
    total_patches = float(batch.loss_mask.sum())

    runs = []
    for step in range(steps + 1):  # the first step warms up (allocations, lazy init)
        t0 = time.perf_counter()
        out = model(batch, sample_draws(batch, config.dit_config.cfm_config, 0, step, torch.device("cpu")))
        loss = weighted_loss_sum(patch_sums(out, batch), lambdas) / total_patches
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # as the trainer does
        t4 = time.perf_counter()
        runs.append(dict(fwd_s=t1 - t0, bwd_s=t2 - t1, clip_s=t3 - t2, optim_s=t4 - t3, step_s=t4 - t0, loss=float(loss)))
    measured = runs[1:]
    return {
        "mode": mode,
        "lora": lora.model_dump() if lora else None,
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for _, p in trainable),
        "batch": {"B": BATCH, "seq_len": int(batch.text_tokens.shape[1]), "text_tokens": TEXT_TOKENS,
                  "audio_patches": patches, "audio_seconds": AUDIO_SECONDS},
        "threads": threads,
        "build_s": build_s,
        "rss_after_build_gib": rss_after_build,
        "warmup_step": runs[0],
        "measured_steps": measured,
        "median_fwd_bwd_s": statistics.median(r["fwd_s"] + r["bwd_s"] for r in measured),
        "median_clip_s": statistics.median(r["clip_s"] for r in measured),
        "median_optim_s": statistics.median(r["optim_s"] for r in measured),
        "median_step_s": statistics.median(r["step_s"] for r in measured),
        "peak_rss_gib": _peak_rss_gib(),
    }


def reference_numbers() -> dict:
    """The reference's fwd+bwd and AdamW seconds and peak RSS per mode (None when the file is absent)."""
    if not REFERENCE.is_file():
        return {}
    found = {}
    for run in json.loads(REFERENCE.read_text())["runs"]:
        if run["mode"] in ("lora-train", "full-train"):
            found[run["mode"].split("-")[0]] = {
                "median_fwd_bwd_s": run["median_fwd_bwd_step_s"],
                "adamw_s": run["adamw_step_second_s"],
                "step_s": run["median_fwd_bwd_step_s"] + run["adamw_step_second_s"],
                "peak_rss_gib": run["peak_rss_incl_adamw_gib"],
            }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--one", choices=["lora", "full"], help=argparse.SUPPRESS)  # child process: one mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_mode(args.one, args.config, args.steps, args.threads)))
        return

    reference = reference_numbers()
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--steps", str(args.steps),
               "--threads", str(args.threads), "--config", str(args.config)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench/train.py: the {mode} run failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = reference.get(mode)
        if ref:
            result["reference"] = ref
            result["speedup_vs_reference"] = ref["step_s"] / result["median_step_s"]
        results.append(result)
    print(json.dumps({"torch": torch.__version__, "config": str(args.config), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
