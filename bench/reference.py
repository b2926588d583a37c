"""Times the official reference implementation (PyPI ``voxcpm==2.0.3``) on this machine; prints one JSON object.

    /tmp/refvenv/bin/python bench/reference.py [--runs lora-train generate] [--threads 2] [--warmup 2] [--steps 3]
                                               [--seconds 3.0] [--timesteps 10] [--dtype float32|bfloat16]
                                               [--model-dir ../shared/models/VoxCPM1.5] [--tokenizer-dir DIR]

Run it with the interpreter of a separate virtual environment that holds ``voxcpm==2.0.3`` and
``torch==2.13.0`` (never this project's own environment): the reference is only imported and called as
a library. The output has the layout of ``../shared/fixtures/official/refperf_voxcpm15_cpu2t.json``
("versions", "threads", "cpu", "runs" with a "mode" each), so bench/train.py and bench/infer.py can be
compared with the reference measured on the same machine, under the same CPU instruction-set cap
(``cpu_flags``, ``isa_caps``: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, and
``torch_cpu_capability``). Each run is its own fresh process, so its peak RSS is its own.

The model is the reference's model of config.json's "architecture" (``VoxCPMModel`` with its ``AudioVAE``
for "voxcpm", ``VoxCPM2Model`` with ``AudioVAEV2`` for "voxcpm2") built from ``--model-dir``/config.json
with random weights (``torch.manual_seed(0)``), on the CPU with ``--threads`` torch threads. The tokenizer
files come from ``--tokenizer-dir`` (default: the model folder if it has tokenizer.json, else
../shared/models/VoxCPM1.5, whose vocabulary VoxCPM2 shares):

    lora-train  float32, LoRA r 32, alpha 64 on the LM and DiT q/k/v/o (the reference's LoRAConfig,
                enable_proj false), frozen base weights as ``from_local(training=True)`` leaves them, the
                batch of bench/train.py (2 samples of 30 random text tokens + 5.12 s of audio given as
                latents), packed by the reference's own ``AudioFeatureProcessingPacker`` (the VAE's place
                is taken by the latents, so no encoding happens), the reference trainer's loss (sum of the
                ``loss/*`` outputs), gradient-norm pass and ``torch.optim.AdamW(lr 1e-5, weight decay 0.01)``.
                Forward, backward, gradient norm and AdamW step are timed apart; --warmup steps, then
                --steps measured steps. The AudioVAE is built and kept in memory, as the reference trainer
                keeps it (its BatchProcessor holds it), but it does not run. VoxCPM2 trains the same way
                (its packer is the same class; this batch has no reference clip).
    generate    the model's ``generate`` at bench/infer.py's settings: its sentence, no prompt,
                --timesteps flow-matching steps, CFG 2.0, min_len = max_len = the patches of --seconds
                (the stop head of random weights is meaningless), retry_badcase off, ``--dtype`` for the
                model and float32 for the VAE as ``from_local`` loads them. After a 2-patch warm-up, one
                timed generation; forward hooks on the stop head (run once per patch) and on the VAE
                decoder stamp the patches and the start of decoding without changing the reference's code
                path. ``s_per_patch_ar`` includes the prefill, ``s_per_patch_median`` is the median over
                the patches after the first. Audio seconds and real-time factors are at the rate of the
                returned waveform (VoxCPM2: the decoder's 48 kHz ``out_sample_rate``); the patch count
                follows from the encoder rate. ``peak_rss_gib`` is the process's peak (the random build
                included), ``peak_rss_generate_gib`` the peak from the warm-up on (bench/infer.py's too).

``load_average_1min_*`` and ``other_cpu_load`` (cores busy in other processes during the timed part):
above ~0.1 other load the timings are noisy.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import SHARED, OtherLoad, PeakRSS, peak_rss_gib, run_child, tokenizer_dir  # noqa: E402

_STARTED = time.perf_counter()  # a run's wall_s counts from here; torch and the reference load after it

DEFAULT_MODEL_DIR = SHARED / "models" / "VoxCPM1.5"
ARCHITECTURES = ("voxcpm", "voxcpm2")  # config.json's "architecture", lower case; absent: "voxcpm"
RUNS = ("lora-train", "generate")
TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."  # bench/infer.py's
TEXT_TOKENS, AUDIO_SECONDS, BATCH = 30, 5.12, 2  # bench/train.py's batch
LORA = dict(enable_lm=True, enable_dit=True, enable_proj=False, r=32, alpha=64)
LEARNING_RATE, WEIGHT_DECAY = 1e-5, 0.01
CFG_VALUE = 2.0
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
VERSIONED = ("voxcpm", "torch", "transformers", "tokenizers", "safetensors", "pydantic", "einops", "numpy", "torchaudio")
INSTALL_HINT = ("install voxcpm==2.0.3 with torch==2.13.0 in a separate venv and run this script with its python "
                "(e.g. /tmp/refvenv/bin/python bench/reference.py)")


# ---------------------------------------------------------------------------------------------- the reference


def _stand_in_for_torchaudio() -> str | None:
    """Make ``import torchaudio`` succeed when its native extension cannot load; -> why, or None if it loads.

    The reference imports torchaudio at module level but calls it only to read and resample prompt
    WAVs, which no run here does. On PyPI the torchaudio wheel is the CUDA build, whose extension needs
    CUDA libraries that a CPU-only torch lacks, so the import fails although nothing here would use it.
    """
    try:
        import torchaudio  # noqa: F401
        return None
    except (ImportError, OSError) as error:
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")
    for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
        del sys.modules[name]  # the half-imported package would fail the same way again
    placeholder = types.ModuleType("torchaudio")
    placeholder.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)  # transformers asks find_spec
    sys.modules["torchaudio"] = placeholder
    return reason


def architecture_of(model_dir: Path) -> str:
    """config.json's "architecture" as the reference picks its model: lower case, "voxcpm" when absent."""
    return str(json.loads((model_dir / "config.json").read_text()).get("architecture", "voxcpm")).lower()


def _import_reference(architecture: str) -> tuple[types.SimpleNamespace, str | None]:
    """The reference's classes for ``architecture`` used here, and why torchaudio was replaced (None if it was not)."""
    try:
        import torch  # noqa: F401

        replaced = _stand_in_for_torchaudio()
        import voxcpm  # noqa: F401
        from transformers import LlamaTokenizerFast
        from voxcpm.training.packers import AudioFeatureProcessingPacker

        # one packer serves both architectures; the model, its config and LoRA schema and the VAE differ
        if architecture == "voxcpm2":
            from voxcpm.model.voxcpm2 import LoRAConfig
            from voxcpm.model.voxcpm2 import VoxCPM2Model as Model
            from voxcpm.model.voxcpm2 import VoxCPMConfig as Config
            from voxcpm.modules.audiovae import AudioVAEV2 as AudioVAE
        else:
            from voxcpm.model.voxcpm import LoRAConfig
            from voxcpm.model.voxcpm import VoxCPMConfig as Config
            from voxcpm.model.voxcpm import VoxCPMModel as Model
            from voxcpm.modules.audiovae import AudioVAE
    except Exception as error:  # any failure means the reference is not usable from this interpreter
        detail = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
        sys.exit(f"bench/reference.py: cannot import the reference package voxcpm ({detail}); {INSTALL_HINT}")
    return types.SimpleNamespace(
        LlamaTokenizerFast=LlamaTokenizerFast, LoRAConfig=LoRAConfig, Config=Config, Model=Model, AudioVAE=AudioVAE,
        Packer=AudioFeatureProcessingPacker,
    ), replaced


def _build(ref, model_dir: Path, tokenizer: Path, dtype: str, **model_args):
    """-> (config, VAE, model): the reference's model with random weights and the AudioVAE it holds."""
    config = ref.Config.model_validate_json((model_dir / "config.json").read_text())
    # The release config names bfloat16 and cuda for its own weights; the model's inputs and KV caches
    # follow config.dtype, so it has to name the dtype these runs use.
    config.dtype = dtype
    config.device = "cpu"
    vae = ref.AudioVAE(config=config.audio_vae_config)
    model = ref.Model(config, ref.LlamaTokenizerFast.from_pretrained(str(tokenizer)), vae, device="cpu", **model_args)
    return config, vae, model


# ---------------------------------------------------------------------------------------------- measuring


class LatentSource:
    """Stands where the reference's packer expects the AudioVAE and hands back given latents.

    The packer turns each waveform into latents with ``audio_vae.encode`` before it lays out the
    sequence; giving it latents drawn beforehand keeps the VAE out of the batch (and out of the timing)
    while the sequence layout, masks and labels stay the reference's own.
    """

    def __init__(self, latents: list, hop_length: int, sample_rate: int):
        self.pending = list(latents)  # [patches, P, D] each, handed out in the packer's sample order
        self.hop_length = hop_length
        self.sample_rate = sample_rate

    def encode(self, wav, sample_rate):
        latent = self.pending.pop(0)
        frames = latent.shape[0] * latent.shape[1]
        assert wav.shape[-1] == frames * self.hop_length, "placeholder waveform and latents disagree"
        return latent.reshape(frames, latent.shape[2]).T.unsqueeze(0)  # the VAE's [1, D, frames]


def run_lora_train(model_dir: Path, tokenizer: Path, threads: int, warmup_steps: int, steps: int) -> dict:
    import torch

    ref, _ = _import_reference(architecture_of(model_dir))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lora = ref.LoRAConfig(**LORA)
    start = time.perf_counter()
    config, vae, model = _build(ref, model_dir, tokenizer, "float32", lora_config=lora)
    # The reference trainer hands the VAE to its batch processor and removes it from the model, so the
    # VAE stays in memory but outside the parameters; only the LoRA matrices train.
    del model.audio_vae
    for name, param in model.named_parameters():
        param.requires_grad = "lora" in name
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    build_s = time.perf_counter() - start
    rss_after_build = peak_rss_gib()

    patch_len = int(vae.hop_length) * config.patch_size
    patches = round(AUDIO_SECONDS * vae.sample_rate / patch_len)
    gen = torch.Generator().manual_seed(0)
    texts, latents = [], []
    for _ in range(BATCH):  # drawn in bench/train.py's order, so both benches see the same values
        texts.append(torch.randint(113, min(20000, config.lm_config.vocab_size), (TEXT_TOKENS,), generator=gen))
        latents.append(torch.randn(patches, config.patch_size, config.feat_dim, generator=gen))
    packer = ref.Packer(dataset_cnt=1, max_len=config.max_length, patch_size=config.patch_size,
                        feat_dim=config.feat_dim, audio_vae=LatentSource(latents, int(vae.hop_length), vae.sample_rate))
    batch = packer(
        audio_tokens=torch.zeros(BATCH, patches * patch_len),  # placeholder waveforms of the right length
        text_tokens=torch.stack(texts).to(torch.int32),  # the reference's collate_fn gives int32 ids
        task_ids=torch.ones(BATCH, dtype=torch.int32),
        dataset_ids=torch.zeros(BATCH, dtype=torch.int32),
        is_prompts=[False] * BATCH,
    )
    inputs = [batch[key] for key in
              ("text_tokens", "text_mask", "audio_feats", "audio_mask", "loss_mask", "position_ids", "labels")]

    rss_fwd_bwd = None

    def step() -> dict:
        nonlocal rss_fwd_bwd
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        outputs = model(*inputs, progress=0.0)
        loss = sum(value for key, value in outputs.items() if key.startswith("loss/"))  # trainer's lambdas are 1
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if rss_fwd_bwd is None:  # before the first AdamW step allocates its state
            rss_fwd_bwd = peak_rss_gib()
        # The trainer computes the gradient norm for its log with a max_norm that never clips.
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        return {"fwd_s": t1 - t0, "bwd_s": t2 - t1, "step_s": t2 - t0, "grad_norm_s": t3 - t2, "adamw_s": t4 - t3,
                "full_step_s": t4 - t0, "loss": float(loss), "peak_rss_gib": peak_rss_gib()}

    warmup = [step() for _ in range(warmup_steps)]
    load = OtherLoad()
    load.start()
    measured = [step() for _ in range(steps)]
    other_load = round(load.stop(), 2)
    every = warmup + measured
    return {
        "mode": "lora-train",
        "lora": lora.model_dump(),
        "total_params_no_vae": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "batch": {"B": BATCH, "seq_len": int(batch["text_tokens"].shape[1]), "text_tokens": TEXT_TOKENS,
                  "audio_patches": patches, "audio_seconds": AUDIO_SECONDS, "patch_size": config.patch_size},
        "build_s": build_s,
        "rss_after_build_gib": rss_after_build,
        "warmup_steps": warmup,
        "measured_steps": measured,
        "median_fwd_s": statistics.median(s["fwd_s"] for s in measured),
        "median_bwd_s": statistics.median(s["bwd_s"] for s in measured),
        "median_fwd_bwd_step_s": statistics.median(s["step_s"] for s in measured),
        "median_grad_norm_s": statistics.median(s["grad_norm_s"] for s in measured),
        "median_full_step_s": statistics.median(s["full_step_s"] for s in measured),
        "peak_rss_fwd_bwd_gib": rss_fwd_bwd,
        "adamw_step_first_s": every[0]["adamw_s"],  # allocates the optimizer state
        "adamw_step_second_s": every[1]["adamw_s"] if len(every) > 1 else None,
        "median_adamw_step_s": statistics.median(s["adamw_s"] for s in measured),
        "peak_rss_incl_adamw_gib": peak_rss_gib(),
        "other_cpu_load": other_load,
        "threads": threads,
        "wall_s": time.perf_counter() - _STARTED,
    }


def run_generate(model_dir: Path, tokenizer: Path, threads: int, seconds: float, timesteps: int, dtype_name: str) -> dict:
    import torch

    ref, _ = _import_reference(architecture_of(model_dir))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    config, vae, model = _build(ref, model_dir, tokenizer, dtype_name)
    # The dtypes from_local gives a loaded model: the model's, a float32 VAE. Its optimize() only
    # compiles on CUDA, so on the CPU there is nothing else to do.
    model = model.to(dtype)
    model.audio_vae = model.audio_vae.to(torch.float32)
    model.eval()
    build_s = time.perf_counter() - start

    # The VAE's sample_rate and hop are its encoder's; generate returns audio at model.sample_rate, the
    # decoder's rate (VoxCPM2: out_sample_rate; VoxCPM1: the same rate)
    patch_samples = int(vae.hop_length) * config.patch_size
    patches = round(seconds * vae.sample_rate / patch_samples)
    text_tokens = len(model.text_tokenizer(TEXT)) + 1  # the prefill: the text's ids and <|audio_start|>

    patch_stamps: list[float] = []
    decode_stamps: list[float] = []
    # The stop head runs once per generated patch, between the patch's DiT and the next LM steps, and the
    # VAE decoder once after the loop: stamping them splits the reference's own generate() call.
    hooks = [
        model.stop_head.register_forward_hook(lambda *_: patch_stamps.append(time.perf_counter())),
        model.audio_vae.decoder.register_forward_pre_hook(lambda *_: decode_stamps.append(time.perf_counter())),
    ]

    def generate(length: int):
        return model.generate(target_text=TEXT, min_len=length, max_len=length, inference_timesteps=timesteps,
                              cfg_value=CFG_VALUE, retry_badcase=False)

    peak = PeakRSS()
    peak.start()  # after the build: what generating needs, as bench/infer.py counts it
    generate(2)  # warm-up, as bench/infer.py does: first-call allocations stay out of the timing
    patch_stamps.clear()
    decode_stamps.clear()
    load_before = round(os.getloadavg()[0], 2)
    load = OtherLoad()
    load.start()
    t0 = time.perf_counter()
    wav = generate(patches)
    total_s = time.perf_counter() - t0
    other_load = round(load.stop(), 2)
    for hook in hooks:
        hook.remove()
    if len(patch_stamps) != patches or len(decode_stamps) != 1:
        raise RuntimeError(f"expected {patches} patches and one decode, stamped {len(patch_stamps)} and {len(decode_stamps)}")

    ar_loop_s = decode_stamps[0] - t0
    per_patch = sorted(b - a for a, b in zip(patch_stamps, patch_stamps[1:], strict=False))
    samples = int(wav.shape[-1])
    audio_s = samples / model.sample_rate
    return {
        "mode": "generate",
        "dtype": dtype_name,
        "params_total": sum(p.numel() for p in model.parameters()),
        "build_s": build_s,
        "text_tokens": text_tokens,
        "patches": len(patch_stamps),
        "inference_timesteps": timesteps,
        "cfg_value": CFG_VALUE,
        "audio_seconds": audio_s,
        "samples": samples,
        "patch_samples": patch_samples,
        "out_sample_rate": model.sample_rate,
        "total_s": total_s,
        "decode_s": total_s - ar_loop_s,
        "ar_loop_s": ar_loop_s,
        "first_patch_s": patch_stamps[0] - t0,  # tokenizing, prefill and the first patch's DiT
        "rtf_total": total_s / audio_s,
        "rtf_ar_loop": ar_loop_s / audio_s,
        "s_per_patch_ar": ar_loop_s / len(patch_stamps),
        # The upper middle value for an even count, as bench/infer.py takes it.
        "s_per_patch_median": per_patch[len(per_patch) // 2] if per_patch else None,
        "s_per_patch_min": per_patch[0] if per_patch else None,
        "finite_audio": bool(torch.isfinite(wav).all()),
        "peak_rss_gib": peak_rss_gib(),
        "peak_rss_generate_gib": peak.gib(),
        "other_cpu_load": other_load,
        "load_average_1min_before": load_before,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "threads": threads,
        "wall_s": time.perf_counter() - _STARTED,
    }


# ---------------------------------------------------------------------------------------------- the machine


def _cpu_flags() -> dict:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return {flag: None for flag in CPU_FLAGS}  # not Linux, or no flags line: unknown rather than absent
    present = set(line.split(":", 1)[1].split())
    return {flag: flag in present for flag in CPU_FLAGS}


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="config.json (+ tokenizer files)")
    parser.add_argument("--tokenizer-dir", type=Path,
                        help="tokenizer files (default: --model-dir if it has tokenizer.json, else ../shared/models/VoxCPM1.5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured training steps first (the first allocates AdamW state)")
    parser.add_argument("--steps", type=int, default=3, help="measured training steps")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio to generate (fixes the patch count)")
    parser.add_argument("--timesteps", type=int, default=10, help="flow-matching steps per generated patch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="generation dtype")
    parser.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # child process: one run
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"no config.json in {args.model_dir}")
    architecture = architecture_of(args.model_dir)
    if architecture not in ARCHITECTURES:
        parser.error(f"{args.model_dir / 'config.json'}: unknown architecture {architecture!r}; the reference has {', '.join(ARCHITECTURES)}")
    tokenizer = args.tokenizer_dir or tokenizer_dir(args.model_dir)
    if not (tokenizer / "tokenizer.json").is_file():
        parser.error(f"no tokenizer.json in {tokenizer}; give --tokenizer-dir")

    if args.one == "lora-train":
        print(json.dumps(run_lora_train(args.model_dir, tokenizer, args.threads, args.warmup, args.steps)))
        return
    if args.one == "generate":
        print(json.dumps(run_generate(args.model_dir, tokenizer, args.threads, args.seconds, args.timesteps, args.dtype)))
        return

    _, torchaudio_replaced = _import_reference(architecture)  # fail here, in one line, before any child starts
    import torch

    runs = []
    for name in args.runs:
        common = ["--model-dir", str(args.model_dir), "--tokenizer-dir", str(tokenizer), "--threads", str(args.threads)]
        if name == "lora-train":
            extra = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        else:
            extra = ["--seconds", str(args.seconds), "--timesteps", str(args.timesteps), "--dtype", args.dtype]
        runs.append(run_child(str(Path(__file__).resolve()), ["--one", name, *common, *extra]))
    print(json.dumps({
        "versions": _versions(),
        "threads": args.threads,
        "cpu": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "isa_caps": {name: os.environ[name] for name in ISA_VARIABLES if name in os.environ},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torchaudio_replaced": torchaudio_replaced,
        "model_dir": str(args.model_dir),
        "architecture": architecture,
        "tokenizer_dir": str(tokenizer),
        "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
