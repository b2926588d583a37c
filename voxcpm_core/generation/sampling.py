"""Speech generation as plain functions (section 6 of the architecture page).

    text (+ prompt wav/transcript) -> prepare_inputs -> prefill (KV caches) -> one patch per AR step
    (LocDiT flow sampling conditioned on the previous position) -> VAE decode (float32) -> waveform

The model classes only hold weights and small helpers; the loop, seeds, prompts and streaming live here.
With a seed, the only RNG use is one ``randn(1, feat_dim, patch_size)`` per patch from a generator seeded
with ``seed`` (the numbers of ``torch.manual_seed(seed)``), so a seed gives the reference's audio.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxcpm_core.config import AudioVAEConfig
from voxcpm_core.cpu.kernels import pack_weights
from voxcpm_core.cpu.memory import reusing_freed_memory
from voxcpm_core.data.audio import load_audio
from voxcpm_core.data.tokenizer import AUDIO_START, TextTokenizer
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.generation.options import SamplingOptions, max_patches
from voxcpm_core.models.audio_vae import AudioVAE
from voxcpm_core.models.kv_cache import KVCache
from voxcpm_core.models.voxcpm import VoxCPMModel

PROMPT_CONTEXT_PATCHES = 2  # last prompt patches decoded in front of the new ones (then cut off)


@dataclass(frozen=True)
class Prompt:
    """A voice to clone: the transcript and the VAE latents of its recording."""

    text: str
    patches: torch.Tensor  # [T, P, D] float32


@dataclass(frozen=True)
class Inputs:
    """One prefix sequence of S positions: target/prompt text ids + 101, then the prompt patches."""

    text_tokens: torch.Tensor  # [1, S] long, 0 at audio positions
    text_mask: torch.Tensor  # [1, S] int32
    feats: torch.Tensor  # [1, S, P, D] float32, 0 at text positions
    feat_mask: torch.Tensor  # [1, S] int32
    target_tokens: int  # len(tokenize(target text)): caps max_len, detects bad cases


@dataclass(frozen=True)
class Step:
    """One AR step: the patch it produced and what produced it (lm/res hidden are the pre-update values)."""

    index: int
    patch: torch.Tensor  # [P, D]
    noise: torch.Tensor  # [1, D, P] initial CFM noise
    mu: torch.Tensor  # [1, H_dit]
    lm_hidden: torch.Tensor  # [1, H]
    residual_hidden: torch.Tensor  # [1, H]
    stop_logits: torch.Tensor  # [1, 2]


@dataclass(frozen=True)
class Generation:
    wav: np.ndarray  # [samples] float32 at sample_rate
    sample_rate: int
    seed: int  # the seed asked for (or drawn); try k used seed + k
    tries: int  # 1 unless bad-case retries ran
    patches: int  # generated patches of the returned audio


def clean_text(text: str) -> str:
    """Newlines to spaces, runs of whitespace to one space (target text only; prompt text is used as given)."""
    return re.sub(r"\s+", " ", text.replace("\n", " "))


def new_seed() -> int:
    return secrets.randbelow(2**31)


def check_prompt_args(prompt_wav_path: str | os.PathLike | None, prompt_text: str | None) -> None:
    """A prompt needs both the recording and its transcript, and the recording must exist."""
    if (prompt_wav_path is None) != (prompt_text is None):
        given, missing = ("prompt audio", "prompt text") if prompt_text is None else ("prompt text", "prompt audio")
        raise VoxCPMError(f"{given} given without {missing}: voice cloning needs both the recording and its transcript")
    if prompt_wav_path is not None and not Path(prompt_wav_path).is_file():
        raise VoxCPMError(f"{prompt_wav_path}: prompt audio file not found")


def wav_to_patches(vae: AudioVAE, wav: np.ndarray | torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mono wave [L] at the VAE rate -> patches [T, P, D] float32; LEFT-padded with zeros to whole patches."""
    wav = torch.as_tensor(wav, dtype=torch.float32)
    patch_samples = vae.hop_length * patch_size
    wav = torch.nn.functional.pad(wav, (-wav.shape[-1] % patch_samples, 0))  # [T * P * hop]
    device = next(vae.parameters()).device
    with torch.inference_mode():
        latents = vae.encode(wav.to(device)[None, None])[0]  # [D, T * P]
    D = latents.shape[0]
    return latents.view(D, -1, patch_size).permute(1, 2, 0).contiguous()  # [T, P, D]


def load_prompt(vae: AudioVAE, wav_path: str | os.PathLike, text: str, patch_size: int) -> Prompt:
    """Read a prompt recording (any rate / channels: mono mix, soxr to the VAE rate) and encode it."""
    wav = load_audio(wav_path, vae.sample_rate)
    if wav.size == 0:
        raise VoxCPMError(f"{wav_path}: the prompt audio is empty; give a recording of a few seconds")
    return Prompt(text=text, patches=wav_to_patches(vae, wav, patch_size))


def prepare_inputs(tokenizer: TextTokenizer, text: str, prompt: Prompt | None, patch_size: int, feat_dim: int) -> Inputs:
    """ids = tokenize(prompt text + cleaned target text) + [101], followed by the prompt patches."""
    target = clean_text(text)
    if not target.strip():
        raise VoxCPMError("the text to synthesize is empty")
    target_tokens = len(tokenizer.encode(target))
    ids = tokenizer.encode((prompt.text if prompt else "") + target) + [AUDIO_START]
    n_text, n_audio = len(ids), len(prompt.patches) if prompt else 0
    S = n_text + n_audio
    text_tokens = torch.zeros(1, S, dtype=torch.long)
    text_tokens[0, :n_text] = torch.tensor(ids)
    text_mask = torch.zeros(1, S, dtype=torch.int32)
    text_mask[0, :n_text] = 1
    feats = torch.zeros(1, S, patch_size, feat_dim)
    if prompt is not None:
        feats[0, n_text:] = prompt.patches.cpu()
    return Inputs(text_tokens, text_mask, feats, 1 - text_mask, target_tokens)


def pack_for_cpu_generation(model: VoxCPMModel) -> int:
    """Prepack (``cpu.kernels.pack_weights``) the weights that CPU generation reads faster prepacked; returns
    how many. Only the products ``cpu.kernels.use_cpu_kernels`` put on oneDNN can be packed.

    bfloat16: every linear. float32: the local encoder and the LocDiT only, which see several rows per
    call; a float32 LM decode step (one row) streams fastest from the plain weights, so packing the LMs
    would double their memory for a faster prefill only. Call again after changing dtype.
    """
    pack_weights(model, enabled=False)
    if model.enc_to_lm_proj.weight.dtype == torch.bfloat16:
        return pack_weights(model)
    return pack_weights(model.feat_encoder) + pack_weights(model.feat_decoder)


@torch.inference_mode()
def decode_steps(
    model: VoxCPMModel, inputs: Inputs, opts: SamplingOptions, max_len: int, generator: torch.Generator
) -> Iterator[Step]:
    """Prefill, then yield one Step per generated patch until the stop head fires (after min_len) or ``max_len``.

    ``max_len`` is the already capped patch budget (``max_patches``); ``opts.max_len`` is not read here.
    """
    cfg = model.config
    ref = model.enc_to_lm_proj.weight
    device, dtype = ref.device, ref.dtype
    S = inputs.text_tokens.shape[1]
    base_cache = KVCache.for_stack(cfg.lm_config, 1, S + max_len, dtype, device)
    res_cache = KVCache.for_stack(cfg.residual_lm_config, 1, S + max_len, dtype, device)
    feats = inputs.feats.to(device, dtype)  # [1, S, P, D]
    lm_h, res_h = model.encode_sequence(
        inputs.text_tokens.to(device), feats, inputs.text_mask.to(device), inputs.feat_mask.to(device), base_cache, res_cache
    )
    lm_h, res_h = lm_h[:, -1], res_h[:, -1]  # [1, H] at the last prefix position
    prev = feats[:, -1].transpose(1, 2)  # [1, D, P]: last prompt patch, zeros without a prompt
    noise_shape = (1, cfg.feat_dim, cfg.patch_size)
    for i in range(max_len):
        mu = model.dit_condition(lm_h, res_h)  # [1, H_dit]
        noise = torch.randn(noise_shape, generator=generator, device=device, dtype=dtype)
        pred = model.feat_decoder.sample(mu, prev, opts.inference_timesteps, opts.cfg_value, noise)  # [1, D, P]
        stop_logits = model.stop_logits(lm_h)  # [1, 2]
        yield Step(i, pred[0].transpose(0, 1), noise, mu, lm_h, res_h, stop_logits)
        if (i > opts.min_len and int(stop_logits.argmax(-1)[0]) == 1) or i == max_len - 1:
            return
        e = model.encode_patches(pred.transpose(1, 2)[:, None])  # [1, 1, H]
        lm_h, res_h = model.decode_step(e, base_cache, res_cache, S + i)
        lm_h, res_h = lm_h[:, 0], res_h[:, 0]
        prev = pred


def decoder_history_frames(cfg: AudioVAEConfig) -> int:
    """How many latent frames before a frame the causal VAE decoder reads to make that frame's samples.

    Traced back from the output: the last conv (k=7) reads 6 earlier samples; each decoder block, last first,
    adds its three residual units (k=7, dilations 1, 3, 9: 6 * 13 samples at its rate) and then its
    transposed conv (kernel 2s, stride s) maps h outputs back to ceil(h / s) + 1 inputs; the input conv
    (k=7) adds 6 frames. Decoding a window with this much left context gives exactly the full decode's samples.
    """
    history = 6
    for stride in reversed(cfg.decoder_rates):
        history = math.ceil((history + 6 * (1 + 3 + 9)) / stride) + 1
    return history + 6


def decode_patches(vae: AudioVAE, patches: torch.Tensor) -> torch.Tensor:
    """patches [n, P, D] -> waveform [n * P * hop] float32 (VAE in float32)."""
    n, P, D = patches.shape
    latents = patches.float().permute(2, 0, 1).reshape(1, D, n * P)  # [1, D, n*P]
    with torch.inference_mode(), reusing_freed_memory(latents.device.type == "cpu"):  # no page faults on CPU
        return vae.decode(latents)[0, 0]


def _seeded_generator(seed: int, model: VoxCPMModel) -> torch.Generator:
    device = model.enc_to_lm_proj.weight.device
    return torch.Generator(device=device).manual_seed(seed)


def _sample_patches(model: VoxCPMModel, inputs: Inputs, opts: SamplingOptions, seed: int, context: torch.Tensor):
    """Run the AR loop once into a preallocated latent buffer = [context patches, generated patches]."""
    max_len = max_patches(inputs.target_tokens, opts.max_len)
    c, P, D = context.shape
    buffer = torch.empty(c + max_len, P, D, device=context.device)  # float32, filled in place
    buffer[:c] = context
    n = 0
    for step in decode_steps(model, inputs, opts, max_len, _seeded_generator(seed, model)):
        buffer[c + step.index] = step.patch
        n = step.index + 1
    return buffer[: c + n], n


def _context_patches(model: VoxCPMModel, prompt: Prompt | None) -> torch.Tensor:
    """The prompt patches decoded in front of the new ones ([0, P, D] without a prompt)."""
    device = model.enc_to_lm_proj.weight.device
    if prompt is None:
        cfg = model.config
        return torch.zeros(0, cfg.patch_size, cfg.feat_dim, device=device)
    return prompt.patches[-PROMPT_CONTEXT_PATCHES:].to(device, torch.float32)


def generate(
    model: VoxCPMModel,
    vae: AudioVAE,
    tokenizer: TextTokenizer,
    text: str,
    prompt: Prompt | None = None,
    opts: SamplingOptions | None = None,
    seed: int | None = None,
) -> Generation:
    """Synthesize ``text`` (in the prompt's voice when given) -> the new speech only, float32.

    With ``retry_badcase``, a run whose patch count reaches ratio * target tokens (it never stopped)
    is redone with seed + 1, + 2, ... up to ``retry_badcase_max_times`` runs; the last one is kept.
    """
    opts = opts or SamplingOptions()
    seed = new_seed() if seed is None else seed
    cfg = model.config
    inputs = prepare_inputs(tokenizer, text, prompt, cfg.patch_size, cfg.feat_dim)
    context = _context_patches(model, prompt)
    runs = opts.retry_badcase_max_times if opts.retry_badcase else 1
    for attempt in range(runs):
        patches, n = _sample_patches(model, inputs, opts, seed + attempt, context)
        if n < opts.retry_badcase_ratio_threshold * inputs.target_tokens:
            break
    wav = decode_patches(vae, patches)[len(context) * cfg.patch_samples :]
    return Generation(wav.cpu().numpy(), vae.sample_rate, seed, attempt + 1, n)


def generate_streaming(
    model: VoxCPMModel,
    vae: AudioVAE,
    tokenizer: TextTokenizer,
    text: str,
    prompt: Prompt | None = None,
    opts: SamplingOptions | None = None,
    seed: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the audio of each new patch (float32 [P * hop]) as soon as it is sampled.

    Each chunk is decoded from a window holding ``decoder_history_frames`` latent frames of left context,
    so the chunks concatenate to ``generate``'s output (up to float rounding). No bad-case retry: audio
    already handed out cannot be taken back.
    """
    opts = opts or SamplingOptions()
    seed = new_seed() if seed is None else seed
    cfg = model.config
    inputs = prepare_inputs(tokenizer, text, prompt, cfg.patch_size, cfg.feat_dim)
    context = _context_patches(model, prompt)
    max_len = max_patches(inputs.target_tokens, opts.max_len)
    c, P, D = context.shape
    history = math.ceil(decoder_history_frames(vae.config) / P)  # in patches
    buffer = torch.empty(c + max_len, P, D, device=context.device)
    buffer[:c] = context
    for step in decode_steps(model, inputs, opts, max_len, _seeded_generator(seed, model)):
        end = c + step.index + 1
        buffer[end - 1] = step.patch
        window = decode_patches(vae, buffer[max(0, end - 1 - history) : end])
        yield window[-cfg.patch_samples :].cpu().numpy()
