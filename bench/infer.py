"""Generation speed at the real VoxCPM1.5 or VoxCPM2 size beside this machine's weight-streaming limit; prints one JSON object.

    python bench/infer.py [--threads 2] [--seconds 3] [--timesteps 10] [--dtypes float32 bfloat16]
                          [--no-pack] [--machine-seconds 0.5] [--model-dir ../shared/models/VoxCPM1.5]
                          [--device cpu|cuda] [--reference FILE | --reference-python PYTHON]
    python bench/infer.py --model-dir ../shared/models/VoxCPM2 ...

Random weights (built from config.json by its architecture's family, nothing is read from disk but the
config and tokenizer; a model folder without tokenizer files, like ../shared/models/VoxCPM2, borrows
VoxCPM1.5's, which VoxCPM2 shares: ``tokenizer_dir`` says which were read), CPU,
the CPU kernels swapped in (cpu.kernels.use_cpu_kernels) and the weights prepacked for oneDNN as
`voxcpm infer` does on CPU (inference.pack_for_cpu_generation; ``--no-pack``: the plain weights);
``--device cuda``: the plain model on the GPU, as `voxcpm infer` runs there, peak GPU memory beside the
RSS, no goals.
Per dtype: seconds per generated patch of the AR loop (median over the patches after the first, so
robust to other load; the mean includes the prefill), VAE decode time, real-time factor of the whole
non-streaming generation (audio seconds at the VAE's output rate: 48 kHz for VoxCPM2), time to first audio
of a streaming generation, peak RSS (``peak_rss_gib``: the process's so far, the random build and earlier
dtypes included; ``peak_rss_generate_gib``: from the dtype's warm-up on, what generating needs, which the
goals compare), and the weight bytes one patch
streams (counted from the linear layers that ran: base LM step, residual LM step, local encoder, the
LocDiT once per non-zero Euler step, projections). ``achieved_gbs`` = those bytes / median s per patch,
beside the machine's matrix-vector weight-streaming GB/s for the dtype (bench/machine.py, measured in the
same run): generation is memory-bound, so that fraction is how close it runs to the machine.
The stop head of random weights is meaningless, so min_len = max_len = the patches of ``--seconds``.
The reference (``reference_<dtype>``, per dtype it has): measured now with ``--reference-python``
(bench/reference.py, same settings), else read from ``--reference`` (default: the fixtures' refperf JSON of
the architecture, VoxCPM1.5's or VoxCPM2's; the VoxCPM1.5 one has float32 only). Goals (``goals``, CPU only):
at most 0.5x the reference's s/patch in the same dtype and no more peak RSS while generating; bfloat16 on a
CPU with native bf16 also at most 0.5x our own float32 s/patch (and, at the VoxCPM1.5 size, 0.35 s).
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
from voxcpm_core.cpu.memory import reusing_freed_memory
from voxcpm_core.families import family_of
from voxcpm_core.generation import sampling as inference
from voxcpm_core.io.checkpoint import load_tokenizer, read_model_config

sys.path.insert(0, str(Path(__file__).parent))
from machine import device_name, synchronize, weight_stream_gbs  # noqa: E402
from measure import SHARED, OtherLoad, PeakRSS, peak_rss_gib, reference_runs, tokenizer_dir  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."
REFERENCE_FILES = {  # the reference's stored figures per architecture (bench/reference.py or refperf layout)
    "voxcpm": SHARED / "fixtures" / "official" / "refperf_voxcpm15_cpu2t.json",
    "voxcpm2": SHARED / "fixtures" / "official" / "refperf_voxcpm2_cpu2t.json",
}
# (figure, at most, times whose figure): "reference" = the reference's run in the same dtype, "float32" = our
# own float32 run, None = an absolute limit. Half the reference's s/patch at no more peak memory: issue 10
# (float32, VoxCPM1.5) and issue 12 (VoxCPM2, both dtypes). The others count only on CPUs with native bf16
# (elsewhere bf16 is emulated and float32 is the fast choice: --dtype auto): bf16 at half our own float32
# (issue 12) and issue 6's absolute bf16 figure, which is VoxCPM1.5's size.
GOALS = {
    "float32": [("s_per_patch_median", 0.5, "reference"), ("peak_rss_generate_gib", 1.0, "reference")],
    "bfloat16": [("s_per_patch_median", 0.5, "reference"), ("peak_rss_generate_gib", 1.0, "reference"),
                 ("s_per_patch_median", 0.5, "float32")],
}
BF16_S_PER_PATCH = {"voxcpm": 0.35}  # by architecture
REFERENCE_FIGURES = ("patches", "s_per_patch_ar", "s_per_patch_median", "decode_s", "total_s", "rtf_total",
                     "peak_rss_gib", "peak_rss_generate_gib")


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
    audio_s = len(wav) / vae.out_sample_rate  # VoxCPM2 decodes at 48 kHz from 16 kHz latents
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


def figure_of(run: dict, figure: str) -> float | None:
    """``figure`` of a run, ours or the reference's; seconds per patch: the median after the first, else (the
    stored reference figures have no median) the mean, prefill included."""
    if figure == "s_per_patch_median":
        return run.get("s_per_patch_median") or run.get("s_per_patch_ar")
    return run.get(figure)


def check_goals(dtype: str, run: dict, reference: dict | None, float32_run: dict | None, architecture: str) -> list[dict]:
    """The goals of a ``dtype`` run that can be judged: the reference's run (same dtype) and our float32 run
    are None when not measured, and so is a peak memory the kernel could not count."""
    goals = GOALS[dtype]
    if dtype == "bfloat16" and architecture in BF16_S_PER_PATCH:
        goals = [*goals, ("s_per_patch_median", BF16_S_PER_PATCH[architecture], None)]
    judged = []
    for figure, factor, base in goals:
        if base != "reference" and not cpu().native_bf16:
            continue
        other = {"reference": reference, "float32": float32_run}.get(base)
        scale = 1.0 if base is None else other and figure_of(other, figure)
        if not scale or run[figure] is None:
            continue
        limit = factor * scale
        judged.append({"figure": figure, "at_most": limit, "of": base, "value": run[figure], "met": run[figure] <= limit})
    return judged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=SHARED / "models" / "VoxCPM1.5", help="config.json (+ tokenizer files)")
    parser.add_argument("--reference", type=Path, help="the reference's figures (bench/reference.py or refperf JSON; "
                        "default: the fixtures' refperf JSON of the model's architecture)")
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
    tokenizer_files = tokenizer_dir(args.model_dir)
    tokenizer = load_tokenizer(tokenizer_files)
    start = time.perf_counter()
    torch.manual_seed(0)
    family = family_of(config)
    model = family.network(config).eval().to(device)
    use_cpu_kernels(model)  # as a model loaded for generation (a no-op on the GPU)
    vae = family.build_vae(config).eval().to(device)
    build_s = time.perf_counter() - start
    patches = round(args.seconds * config.sample_rate / config.patch_samples)
    dtypes = sorted(args.dtypes, key=["float32", "bfloat16"].index)  # float32 first: .to() rounds the weights
    references = {}  # dtype -> the reference's figures, with where they came from
    for name in dtypes:
        ref_runs, ref_source = reference_runs(
            args.reference or REFERENCE_FILES[config.architecture], args.reference_python, ["generate"],
            ["--threads", str(args.threads), "--model-dir", str(args.model_dir), "--tokenizer-dir", str(tokenizer_files),
             "--seconds", str(args.seconds), "--timesteps", str(args.timesteps)], dtype=name)
        if "generate" in ref_runs:
            references[name] = {k: ref_runs["generate"].get(k) for k in REFERENCE_FIGURES} | {"source": ref_source}

    runs, outputs = {}, {}
    for name in dtypes:
        dtype = getattr(torch, name)
        model.to(dtype)
        if device.type == "cpu" and not args.no_pack:
            inference.pack_for_cpu_generation(model)
        peak = PeakRSS()
        peak.start()  # after the build, rounding and packing: what generating in this dtype holds
        measure(model, vae, tokenizer, 2, args.timesteps)  # warm-up
        run, *outputs[name] = measure(model, vae, tokenizer, patches, args.timesteps)
        run["peak_rss_generate_gib"] = None if peak.gib() is None else round(peak.gib(), 2)
        if args.machine_seconds > 0:
            # right after the run; its 512 MiB of weights are handed back after it, else the next dtype's
            # generation would count them
            with reusing_freed_memory(device.type == "cpu"):
                limit = weight_stream_gbs(dtype, args.machine_seconds, 1, device)["peak_gbs"]
            run["machine_stream_gbs"] = round(limit, 2)
            run["fraction_of_stream_limit"] = round(run["achieved_gbs"] / limit, 3)
        reference = references.get(name)
        if reference is not None:
            speedup = figure_of(reference, "s_per_patch_median") / run["s_per_patch_median"]
            run["speedup_vs_reference_s_per_patch"] = round(speedup, 2)  # in the same dtype
        on_cpu = device.type == "cpu"  # the goals are the CPU's
        run["goals"] = check_goals(name, run, reference, runs.get("float32"), config.architecture) if on_cpu else []
        runs[name] = run

    result = {
        "torch": torch.__version__,
        "model": str(args.model_dir / "config.json"),
        "architecture": config.architecture,
        "tokenizer_dir": str(tokenizer_files),
        "sample_rate": vae.sample_rate,
        "out_sample_rate": vae.out_sample_rate,
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
    for name, reference in references.items():
        result[f"reference_{name}"] = reference
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
