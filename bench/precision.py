"""bf16 against float32 training on the embedded demo: losses of the same 50-step LoRA run; prints one JSON object.

    python bench/precision.py [--steps 50] [--threads 2] [--config conf/demo/lora.yaml]

Runs the demo config (built on first use) twice from the same seed, ``precision: fp32`` then
``precision: bf16`` (bf16 autocast on CPUs with native bf16, else a float32 fallback that the
output reports), with validation, samples and checkpoints off, and compares the logged training
losses: per logged step, and their mean over the run. Issue 6's goal: within 2% of float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from voxcpm_core.cpu.capability import cpu
from voxcpm_core.training import trainer
from voxcpm_core.training.config import load_train_config
from voxcpm_core.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("loss/diff", "loss/stop")
GOAL_RELATIVE = 0.02


def run(config: Path, precision: str, steps: int, save_path: Path) -> tuple[list[dict], float]:
    overrides = [f"precision={precision}", f"num_iters={steps}", f"max_steps={steps}", "log_interval=1",
                 "valid_interval=0", f"save_interval={steps}", f"save_path={save_path}"]
    cfg = load_train_config(config, overrides)
    start = time.perf_counter()
    trainer.train(cfg, "lora")
    return [m for m in read_metrics(save_path) if "loss/diff" in m], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "conf" / "demo" / "lora.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    curves, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            curves[precision], seconds[precision] = run(args.config, precision, args.steps, Path(tmp) / precision)
    fp32, bf16 = curves["fp32"], curves["bf16"]
    comparison = {}
    for key in LOSSES:
        a, b = [m[key] for m in fp32], [m[key] for m in bf16]
        mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
        relative = abs(mean_b - mean_a) / abs(mean_a)
        comparison[key] = {
            "fp32_mean": mean_a,
            "bf16_mean": mean_b,
            "relative_difference_of_means": relative,
            "fp32_last": a[-1],
            "bf16_last": b[-1],
            "max_relative_difference_per_step": max(abs(y - x) / abs(x) for x, y in zip(a, b, strict=True)),
            "goal_met": relative <= GOAL_RELATIVE,
        }
    print(json.dumps({
        "torch": torch.__version__,
        "config": str(args.config),
        "steps": args.steps,
        "threads": args.threads,
        "cpu": cpu().to_dict(),
        "seconds": seconds,
        "goal": f"mean loss over the run within {GOAL_RELATIVE:.0%} of float32",
        "losses": comparison,
    }, indent=1))


if __name__ == "__main__":
    main()
