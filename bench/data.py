"""Latent-cache build rate at the real VoxCPM1.5 VAE size (random weights, float32); prints one JSON object.

    python bench/data.py [--clips 8] [--seconds 5] [--threads 2] [--batch-clips 1 4] [--machine-seconds 0.5]
                         [--device cpu|cuda]

Writes ``--clips`` WAV clips of ``--seconds`` (44.1 kHz tones) to a temporary folder and fills a fresh
latent cache from them exactly as training does (file hashing, audio decoding on the worker threads,
batched VAE encoding reusing freed memory, atomic writes), once per ``--batch-clips`` value (clips per VAE
call). Reports clips per second and seconds per clip beside the
reference's 4.57 s per 5 s clip, and the VAE encoder's FLOP/s (convolution FLOPs of one clip, counted
by torch's FlopCounterMode) as a fraction of this machine's float32 matmul peak (bench/machine.py,
measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.flop_counter import FlopCounterMode

from voxcpm_core.config import parse_model_config
from voxcpm_core.data.latent_cache import LatentCache
from voxcpm_core.models.audio_vae import AudioVAE

sys.path.insert(0, str(Path(__file__).parent))
from machine import device_name, matmul_gflops  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_CONFIG = SHARED / "models" / "VoxCPM1.5" / "config.json"
REFERENCE = SHARED / "fixtures" / "official" / "refperf_voxcpm15_cpu2t.json"


def write_clips(folder: Path, count: int, seconds: float, sample_rate: int) -> list[Path]:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    paths = []
    for i in range(count):
        path = folder / f"clip{i:03d}.wav"
        sf.write(path, (0.3 * np.sin(2 * np.pi * (110 + 20 * i) * t)).astype(np.float32), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def _rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def encode_flops_per_clip(vae: AudioVAE, seconds: float) -> int:
    """FLOPs of one VAE encode of a ``seconds`` clip."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.encode(torch.zeros(1, 1, round(seconds * vae.sample_rate), device=next(vae.parameters()).device))
    return counter.get_total_flops()


def reference_seconds_per_clip() -> float | None:
    if not REFERENCE.is_file():
        return None
    runs = json.loads(REFERENCE.read_text())["runs"]
    return next((r["encode_median_s"] for r in runs if r["mode"] == "vae-encode"), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each clip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-clips", type=int, nargs="+", default=[1, 4], help="clips per VAE call, one build each")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--machine-seconds", type=float, default=0.5, help="per machine-limit figure; 0 skips it")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the VAE encodes")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = parse_model_config(json.loads(args.config.read_text()), source=str(args.config))
    vae = AudioVAE(config.audio_vae_config).eval().to(device)
    reference = reference_seconds_per_clip()
    peak = matmul_gflops(torch.float32, args.machine_seconds, device)["peak_gflops"] if args.machine_seconds > 0 else None
    gflop_per_clip = encode_flops_per_clip(vae, args.seconds) / 1e9
    builds = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_clips(Path(tmp), args.clips, args.seconds, vae.sample_rate)
        for batch_clips in args.batch_clips:
            cache = LatentCache(Path(tmp) / f"cache{batch_clips}", vae, config.patch_size, max_batch_clips=batch_clips)
            start = time.perf_counter()
            entries = cache.ensure(paths)
            elapsed = time.perf_counter() - start
            builds.append({
                "batch_clips": batch_clips,
                "build_s": elapsed,
                "clips_per_s": args.clips / elapsed,
                "s_per_clip": elapsed / args.clips,
                "speedup_vs_reference": reference * args.clips / elapsed if reference else None,
                "encode_gflops": gflop_per_clip * args.clips / elapsed,
                "fraction_of_matmul_peak": gflop_per_clip * args.clips / elapsed / peak if peak else None,
                "rss_after_gib": _rss_gib(),  # the encoding's freed memory is handed back afterwards
                "latents_shape": list(LatentCache.load(entries[0]).shape),
            })
    print(json.dumps({
        "torch": torch.__version__,
        "device": device_name(device),
        "threads": args.threads,
        "clips": args.clips,
        "clip_seconds": args.seconds,
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "reference_s_per_clip": reference,
        "encode_gflop_per_clip": gflop_per_clip,
        "machine_matmul_peak_gflops_float32": peak,
        "builds": builds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }, indent=1))


if __name__ == "__main__":
    main()
