"""Speech generation as plain functions (section 6 of the architecture page, section 7 of the VoxCPM2 page).

    text (+ prompt wav/transcript, + reference wav) -> prepare_inputs -> prefill (KV caches) -> one patch per
    AR step (LocDiT flow sampling conditioned on the previous position) -> VAE decode (float32) -> waveform

The model classes only hold weights and small helpers; the loop, seeds, prompts and streaming live here.
With a seed, the only RNG use is one ``randn(1, feat_dim, patch_size)`` per patch from a generator seeded
with ``seed`` (the numbers of ``torch.manual_seed(seed)``), so a seed gives the reference's audio.

Modes (the model family lists which it has): zero-shot (text only), continuation (a prompt recording and
its transcript: the new speech continues it), reference (VoxCPM2: a clip of the voice, no transcript) and
combined (reference + prompt).
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
from voxcpm_core.data.tokenizer import AUDIO_START, REF_AUDIO_END, REF_AUDIO_START, TextTokenizer
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.families import family_of
from voxcpm_core.generation.options import SamplingOptions, max_patches
from voxcpm_core.models.audio_vae import AudioVAE
from voxcpm_core.models.kv_cache import KVCache
from voxcpm_core.models.voxcpm import VoxCPMModel


@dataclass(frozen=True)
class Prompt:
    """A recording to continue: its transcript and its VAE latents (left-padded, so real audio ends them)."""

    text: str
    patches: torch.Tensor  # [T, P, D] float32


@dataclass(frozen=True)
class Reference:
    """A clip of the voice to clone without a transcript (VoxCPM2); right-padded latents."""

    patches: torch.Tensor  # [R, P, D] float32


@dataclass(frozen=True)
class Inputs:
    """One prefix sequence of S positions: [103, reference patches, 104], text ids + 101, [prompt patches]."""

    text_tokens: torch.Tensor  # [1, S] long, 0 at audio positions
    text_mask: torch.Tensor  # [1, S] int32
    feats: torch.Tensor  # [1, S, P, D] float32, 0 at text positions
    feat_mask: torch.Tensor  # [1, S] int32
    target_tokens: int  # len(tokenize(target text)): caps max_len, detects bad cases

    def context(self, max_patches: int) -> torch.Tensor:
        """The patches decoded in front of the generated ones (and cut off after): when the prefix ends
        with audio, the last ``max_patches`` audio positions (with a short prompt, reference patches too);
        else none. -> [c, P, D]"""
        if not self.feat_mask[0, -1]:
            return self.feats[0, :0]
        rows = self.feat_mask[0].nonzero().squeeze(1)[-max_patches:]
        return self.feats[0, rows]


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
        raise VoxCPMError(f"{prompt_wav_path}: prompt audio file not found", param="prompt_wav_path")


def _require_reference_mode(config) -> None:
    family = family_of(config)
    if "reference" not in family.generation_modes:
        raise VoxCPMError(
            f"reference audio needs a VoxCPM2 model; this is a {family.architecture!r} model, whose modes are "
            f"{', '.join(family.generation_modes)}: clone with prompt audio and its transcript instead",
            param="reference_wav_path",
        )


def check_reference_path(reference_wav_path: str | os.PathLike | None) -> None:
    if reference_wav_path is not None and not Path(reference_wav_path).is_file():
        raise VoxCPMError(f"{reference_wav_path}: reference audio file not found", param="reference_wav_path")


def check_reference_args(model: VoxCPMModel, reference_wav_path: str | os.PathLike | None) -> None:
    """A reference clip needs a family with the reference mode, and the file must exist."""
    if reference_wav_path is not None:
        _require_reference_mode(model.config)
        check_reference_path(reference_wav_path)


def wav_to_patches(vae: AudioVAE, wav: np.ndarray | torch.Tensor, patch_size: int, pad_left: bool = True) -> torch.Tensor:
    """Mono wave [L] at the VAE rate -> patches [T, P, D] float32, zero-padded to whole patches on the left
    (a prompt: real audio ends it) or on the right (a reference)."""
    wav = torch.as_tensor(wav, dtype=torch.float32)
    pad = -wav.shape[-1] % (vae.hop_length * patch_size)
    wav = torch.nn.functional.pad(wav, (pad, 0) if pad_left else (0, pad))  # [T * P * hop]
    device = next(vae.parameters()).device
    with torch.inference_mode():
        latents = vae.encode(wav.to(device)[None, None])[0]  # [D, T * P]
    D = latents.shape[0]
    return latents.view(D, -1, patch_size).permute(1, 2, 0).contiguous()  # [T, P, D]


def _read_clip(vae: AudioVAE, wav_path: str | os.PathLike, what: str) -> np.ndarray:
    """Any rate and channel count: mono mix, soxr to the VAE's encoder rate."""
    wav = load_audio(wav_path, vae.sample_rate)
    if wav.size == 0:
        raise VoxCPMError(f"{wav_path}: the {what} audio is empty; give a recording of a few seconds")
    return wav


def load_prompt(vae: AudioVAE, wav_path: str | os.PathLike, text: str, patch_size: int) -> Prompt:
    """Read and encode a prompt recording."""
    return Prompt(text=text, patches=wav_to_patches(vae, _read_clip(vae, wav_path, "prompt"), patch_size))


def load_reference(vae: AudioVAE, wav_path: str | os.PathLike, patch_size: int) -> Reference:
    """Read and encode a reference clip."""
    return Reference(wav_to_patches(vae, _read_clip(vae, wav_path, "reference"), patch_size, pad_left=False))


def prepare_inputs(
    tokenizer: TextTokenizer,
    text: str,
    prompt: Prompt | None,
    patch_size: int,
    feat_dim: int,
    reference: Reference | None = None,
) -> Inputs:
    """[103, reference patches, 104] (with a reference), tokenize(prompt text + cleaned target text) + [101],
    then the prompt patches (with a prompt)."""
    target = clean_text(text)
    if not target.strip():
        raise VoxCPMError("the text to synthesize is empty")
    text_ids = tokenizer.encode((prompt.text if prompt else "") + target) + [AUDIO_START]
    segments: list[list[int] | torch.Tensor] = []  # token ids, or patches [n, P, D]
    if reference is not None:
        segments += [[REF_AUDIO_START], reference.patches, [REF_AUDIO_END]]
    segments.append(text_ids)
    if prompt is not None:
        segments.append(prompt.patches)
    S = sum(len(segment) for segment in segments)
    text_tokens = torch.zeros(1, S, dtype=torch.long)
    text_mask = torch.zeros(1, S, dtype=torch.int32)
    feats = torch.zeros(1, S, patch_size, feat_dim)
    at = 0
    for segment in segments:
        n = len(segment)
        if isinstance(segment, list):
            text_tokens[0, at : at + n] = torch.tensor(segment)
            text_mask[0, at : at + n] = 1
        else:
            feats[0, at : at + n] = segment.cpu()
        at += n
    return Inputs(text_tokens, text_mask, feats, 1 - text_mask, len(tokenizer.encode(target)))


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


def _prepare(model: VoxCPMModel, tokenizer: TextTokenizer, text: str, prompt: Prompt | None, reference: Reference | None):
    """-> (inputs, context patches on the model's device as float32) for one request."""
    cfg = model.config
    if reference is not None:
        _require_reference_mode(cfg)
    inputs = prepare_inputs(tokenizer, text, prompt, cfg.patch_size, cfg.feat_dim, reference)
    context = inputs.context(family_of(cfg).context_patches)
    return inputs, context.to(model.enc_to_lm_proj.weight.device, torch.float32)


def generate(
    model: VoxCPMModel,
    vae: AudioVAE,
    tokenizer: TextTokenizer,
    text: str,
    prompt: Prompt | None = None,
    opts: SamplingOptions | None = None,
    seed: int | None = None,
    reference: Reference | None = None,
) -> Generation:
    """Synthesize ``text`` (continuing ``prompt``, in ``reference``'s voice, when given) -> the new speech
    only, float32 at the VAE's output rate.

    With ``retry_badcase``, a run whose patch count reaches ratio * target tokens (it never stopped)
    is redone with seed + 1, + 2, ... up to ``retry_badcase_max_times`` runs; the last one is kept.
    """
    opts = opts or SamplingOptions()
    seed = new_seed() if seed is None else seed
    inputs, context = _prepare(model, tokenizer, text, prompt, reference)
    runs = opts.retry_badcase_max_times if opts.retry_badcase else 1
    for attempt in range(runs):
        patches, n = _sample_patches(model, inputs, opts, seed + attempt, context)
        if n < opts.retry_badcase_ratio_threshold * inputs.target_tokens:
            break
    wav = decode_patches(vae, patches)[len(context) * model.config.out_patch_samples :]
    return Generation(wav.cpu().numpy(), vae.out_sample_rate, seed, attempt + 1, n)


def generate_streaming(
    model: VoxCPMModel,
    vae: AudioVAE,
    tokenizer: TextTokenizer,
    text: str,
    prompt: Prompt | None = None,
    opts: SamplingOptions | None = None,
    seed: int | None = None,
    reference: Reference | None = None,
) -> Iterator[np.ndarray]:
    """Yield the audio of each new patch (float32 [P * decoder hop]) as soon as it is sampled.

    Each chunk is decoded from a window holding ``decoder_history_frames`` latent frames of left context,
    the context patches of a prompt included, so the chunks concatenate to ``generate``'s output (up to
    float rounding) in every mode. No bad-case retry: audio already handed out cannot be taken back.
    """
    opts = opts or SamplingOptions()
    seed = new_seed() if seed is None else seed
    inputs, context = _prepare(model, tokenizer, text, prompt, reference)
    max_len = max_patches(inputs.target_tokens, opts.max_len)
    c, P, D = context.shape
    history = math.ceil(decoder_history_frames(vae.config) / P)  # in patches
    chunk = model.config.out_patch_samples
    buffer = torch.empty(c + max_len, P, D, device=context.device)
    buffer[:c] = context
    for step in decode_steps(model, inputs, opts, max_len, _seeded_generator(seed, model)):
        end = c + step.index + 1
        buffer[end - 1] = step.patch
        window = decode_patches(vae, buffer[max(0, end - 1 - history) : end])
        yield window[-chunk:].cpu().numpy()
