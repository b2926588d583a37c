"""Generation speed at the real VoxCPM1.5 size beside this machine's weight-streaming limit; prints one JSON object.

    python bench/infer.py [--threads 2] [--seconds 3] [--timesteps 10] [--dtypes float32 bfloat16]
                          [--no-pack] [--machine-seconds 0.5] [--model-dir ../shared/models/VoxCPM1.5]
                          [--device cpu|cuda]

Random weights (built from config.json, nothing is read from disk but the config and tokenizer), CPU,
the CPU kernels swapped in (cpu.kernels.use_cpu_kernels) and the weights prepacked for oneDNN as
`voxcpm infer` does on CPU (inference.pack_for_cpu_generation; ``--no-pack``: the plain weights);
``--device cuda``: the plain model on the GPU, as `voxcpm infer` runs there, peak GPU memory beside the
RSS, no goals.
Per dtype: seconds per generated patch of the AR loop (median over the patches after the first, so
robust to other load; the mean includes the prefill), VAE decode time, real-time factor of the whole
non-streaming generation, time to first audio of a streaming generation, and the weight bytes one patch
streams (counted from the linear layers that ran: base LM step, residual LM step, local encoder, the
LocDiT once per non-zero Euler step, projections). ``achieved_gbs`` = those bytes / median s per patch,
beside the machine's matrix-vector weight-streaming GB/s for the dtype (bench/machine.py, measured in the
same run): generation is memory-bound, so that fraction is how close it runs to the machine.
The stop head of random weights is meaningless, so min_len = max_len = the patches of ``--seconds``.
``bfloat16_vs_float32``: the same seed and weights (bf16-rounded) in both dtypes, relative L2 differences
of the latents and waveform, beside what rounding the float32 latents to bf16 alone gives.
``other_cpu_load``: cores used by other processes meanwhile; above ~0.1 the timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from voxcpm_core.cpu.capability import cpu
from voxcpm_core.cpu.kernels import use_cpu_kernels
from voxcpm_core.families import family_of
from voxcpm_core.generation import sampling as inference
from voxcpm_core.io.checkpoint import load_tokenizer, read_model_config

sys.path.insert(0, str(Path(__file__).parent))
from machine import device_name, synchronize, weight_stream_gbs  # noqa: E402
from measure import OtherLoad, peak_rss_gib, reference_runs  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."
# float32: issue 10's goal on every CPU class; bfloat16: issue 6's, counted only with native bf16 (elsewhere
# bf16 is emulated and float32 is the fast choice: --dtype auto)
GOALS_S_PER_PATCH = {"float32": ("reference", 0.5), "bfloat16": ("absolute", 0.35)}


def weight_bytes_of_one_patch(steps) -> int:
    """Bytes of linear-layer weights read while ``steps`` (a decode_steps iterator) makes its next patch."""
    total = 0

    def count(module, args):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()

    handle = nn.modules.module.register_module_forward_pre_hook(count)
    try:
        next(steps)
    finally:
        handle.remove()
    return total


def measure(model, vae, tokenizer, patches: int, timesteps: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """-> (figures, generated patches [n, P, D] float32, waveform)."""
    cfg = model.config
    device = model.enc_to_lm_proj.weight.device
    opts = inference.SamplingOptions(
        inference_timesteps=timesteps, min_len=patches, max_len=patches, retry_badcase=False
    )
    inputs = inference.prepare_inputs(tokenizer, TEXT, None, cfg.patch_size, cfg.feat_dim)
    assert inference.max_patches(inputs.target_tokens, patches) == patches, "text too short for --seconds"

    steps = inference.decode_steps(model, inputs, opts, 3, torch.Generator(device).manual_seed(0))
    next(steps)
    weight_bytes = weight_bytes_of_one_patch(steps)

    load = OtherLoad()
    load.start()
    start = time.perf_counter()  # time to first audio: prefill, one patch, its decode
    first = next(inference.generate_streaming(model, vae, tokenizer, TEXT, None, opts, seed=0))
    ttfa = time.perf_counter() - start

    start = time.perf_counter()  # the steps of inference.generate, timed one by one
    inputs = inference.prepare_inputs(tokenizer, TEXT, None, cfg.patch_size, cfg.feat_dim)
    steps, stamps = [], [start]
    for step in inference.decode_steps(model, inputs, opts, patches, torch.Generator(device).manual_seed(0)):
        steps.append(step)
        synchronize(device)
        stamps.append(time.perf_counter())
    ar_s = stamps[-1] - start
    per_patch = sorted(b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True))  # after the first (prefill) patch
    generated = torch.stack([s.patch for s in steps]).float()
    wav = inference.decode_patches(vae, generated)
    synchronize(device)
    total_s = time.perf_counter() - start
    other_load = load.stop()
    audio_s = len(wav) / vae.sample_rate
    median = per_patch[len(per_patch) // 2]
    figures = {
        "text_tokens": inputs.target_tokens,
        "patches": len(steps),
        "audio_seconds": round(audio_s, 3),
        "first_chunk_samples": len(first),
        "time_to_first_audio_s": round(ttfa, 3),
        "ar_loop_s": round(ar_s, 3),
        "s_per_patch_ar": round(ar_s / len(steps), 4),  # the reference's figure: prefill included
        "s_per_patch_median": round(median, 4),
        "s_per_patch_min": round(per_patch[0], 4),
        "weight_gb_per_patch": round(weight_bytes / 1e9, 3),
        "achieved_gbs": round(weight_bytes / median / 1e9, 2),
        "decode_s": round(total_s - ar_s, 3),
        "total_s": round(total_s, 3),
        "rtf_total": round(total_s / audio_s, 3),
        "finite_audio": bool(torch.isfinite(wav).all()),
        "other_cpu_load": round(other_load, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    return figures, generated, wav


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def bf16_vs_fp32(fp32: tuple[torch.Tensor, torch.Tensor], bf16: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """How far the bf16 generation lands from the float32 one (same seed, bf16-rounded weights)."""
    (patches32, wav32), (patches16, wav16) = fp32, bf16
    return {
        "first_patch_rel_l2": round(relative_l2(patches16[0], patches32[0]), 4),
        "latents_rel_l2": round(relative_l2(patches16, patches32), 4),
        "wav_rel_l2": round(relative_l2(wav16, wav32), 4),
        "bf16_rounding_of_fp32_latents_rel_l2": round(relative_l2(patches32.bfloat16(), patches32), 4),
    }


def reference_s_per_patch(reference: dict) -> float:
    """The reference's median seconds per patch after the first, like ours; the fixture has only the mean."""
    return reference.get("s_per_patch_median") or reference["s_per_patch_ar"]


def check_goal(dtype: str, run: dict, reference: dict | None) -> dict | None:
    kind, value = GOALS_S_PER_PATCH.get(dtype, (None, None))
    if kind is None or (kind == "reference" and reference is None) or (dtype == "bfloat16" and not cpu().native_bf16):
        return None
    limit = value * reference_s_per_patch(reference) if kind == "reference" else value
    return {"figure": "s_per_patch_median", "at_most": limit, "met": run["s_per_patch_median"] <= limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=SHARED / "models" / "VoxCPM1.5", help="config + tokenizer")
    parser.add_argument("--reference", type=Path, default=SHARED / "fixtures" / "official" / "refperf_voxcpm15_cpu2t.json",
                        help="the reference's figures (bench/reference.py JSON)")
    parser.add_argument("--reference-python", metavar="PYTHON",
                        help="measure the reference now, side by side: an interpreter with voxcpm==2.0.3 installed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--no-pack", action="store_true", help="plain weights (voxcpm infer --no-optimize)")
    parser.add_argument("--machine-seconds", type=float, default=0.5, help="per machine-limit figure; 0 skips them")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)

    config = read_model_config(args.model_dir)
    tokenizer = load_tokenizer(args.model_dir)
    start = time.perf_counter()
    torch.manual_seed(0)
    family = family_of(config)
    model = family.network(config).eval().to(device)
    use_cpu_kernels(model)  # as a model loaded for generation (a no-op on the GPU)
    vae = family.build_vae(config).eval().to(device)
    build_s = time.perf_counter() - start
    patches = round(args.seconds * config.sample_rate / config.patch_samples)
    ref_runs, ref_source = reference_runs(args.reference, args.reference_python, ["generate"], [
        "--threads", str(args.threads), "--model-dir", str(args.model_dir), "--seconds", str(args.seconds),
        "--timesteps", str(args.timesteps)])
    reference = None
    if "generate" in ref_runs:
        reference = {k: ref_runs["generate"].get(k) for k in
                     ("patches", "s_per_patch_ar", "s_per_patch_median", "decode_s", "total_s", "rtf_total", "peak_rss_gib")}

    runs, outputs = {}, {}
    for name in sorted(args.dtypes, key=["float32", "bfloat16"].index):  # float32 first: .to() rounds the weights
        dtype = getattr(torch, name)
        model.to(dtype)
        if device.type == "cpu" and not args.no_pack:
            inference.pack_for_cpu_generation(model)
        measure(model, vae, tokenizer, 2, args.timesteps)  # warm-up
        run, *outputs[name] = measure(model, vae, tokenizer, patches, args.timesteps)
        if args.machine_seconds > 0:
            limit = weight_stream_gbs(dtype, args.machine_seconds, 1, device)["peak_gbs"]  # right after the run
            run["machine_stream_gbs"] = round(limit, 2)
            run["fraction_of_stream_limit"] = round(run["achieved_gbs"] / limit, 3)
        if reference is not None:
            run["speedup_vs_reference_s_per_patch"] = round(reference_s_per_patch(reference) / run["s_per_patch_median"], 2)
        run["goal"] = check_goal(name, run, reference) if device.type == "cpu" else None  # the goals are the CPU's
        runs[name] = run

    result = {
        "torch": torch.__version__,
        "model": str(args.model_dir / "config.json"),
        "params_no_vae": sum(p.numel() for p in model.parameters()),
        "params_vae": sum(p.numel() for p in vae.parameters()),
        "device": device_name(device),
        "cpu": cpu().to_dict(),
        "threads": args.threads,
        "packed_weights": device.type == "cpu" and not args.no_pack,
        "load_average_1min_before": load_before,
        "inference_timesteps": args.timesteps,
        "build_s": round(build_s, 2),
        "runs": runs,
    }
    if len(outputs) == 2:
        result["bfloat16_vs_float32"] = bf16_vs_fp32(outputs["float32"], outputs["bfloat16"])
    if reference is not None:
        result["reference_float32"] = reference | {"source": ref_source}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
