"""The Python API of the fine-tuning guide: ``VoxCPM.from_pretrained``, ``generate``, LoRA hot-swapping.

    tts = VoxCPM.from_pretrained("path/to/VoxCPM2", lora_weights_path="ckpt/step_0002000")
    wav = tts.generate("Hello.", prompt_wav_path="prompt.wav", prompt_text="Its transcript.", seed=1)
    wav = tts.generate("(A warm, gentle voice)Hello.", reference_wav_path="voice.wav")  # VoxCPM2
    tts.set_lora_enabled(False); tts.load_lora("ckpt/other"); tts.unload_lora()

A thin layer over ``io`` (loading), ``generation`` and ``adapters``/``models.lora`` (LoRA): swapping
adapters copies LoRA tensors in place and never reloads the base weights. Adapter folders are read and
checked by ``adapters.load_adapter``; an ``Adapter`` it returned can be passed wherever a folder can.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from voxcpm_core.adapters import Adapter, load_adapter, resolve_base_model
from voxcpm_core.cpu.kernels import use_cpu_kernels
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.generation import sampling as inference
from voxcpm_core.generation.options import SamplingOptions
from voxcpm_core.io.checkpoint import LoadedModel, load_model_dir
from voxcpm_core.io.hub import resolve_model_dir
from voxcpm_core.models import lora
from voxcpm_core.models.lora import LoRAConfig


DEFAULT_MODEL_ID = "openbmb/VoxCPM2"  # what from_pretrained() loads without a model, as upstream


def _read(adapter: str | os.PathLike | Adapter) -> Adapter:
    return adapter if isinstance(adapter, Adapter) else load_adapter(adapter)


def _structure(adapter: Adapter) -> LoRAConfig:
    """The LoRA structure to build for an adapter. Without a lora_config.json it is read from the tensors
    and alpha is the default: a warning, as an adapter trained with another alpha would be scaled wrongly."""
    config = adapter.lora_config()
    if adapter.config is None:
        warnings.warn(
            f"{adapter.path}: no lora_config.json; LoRA structure read from the weights (r={config.r}), "
            f"alpha assumed {config.alpha}: give lora_config if it was trained with another alpha",
            stacklevel=3,
        )
    return config


def _check_alpha(layers: set[tuple[int, float]], config: LoRAConfig, path: str | os.PathLike) -> None:
    """An adapter trained with another alpha than the LoRA layers (r, alpha) it goes into would be scaled
    wrongly. Only checked when the ranks agree: a rank mismatch is reported by the load, with the shapes."""
    ranks, alphas = {r for r, _ in layers}, {a for _, a in layers}
    if ranks == {config.r} and alphas != {config.alpha}:
        raise VoxCPMError(
            f"{path}: lora_config.json says alpha={config.alpha:g} but the LoRA structure it is loaded into uses "
            f"alpha={', '.join(f'{a:g}' for a in sorted(alphas))}, so its update would be scaled wrongly; "
            f"load it with its own lora_config.json, or set alpha: {config.alpha:g} in the LoRA config you give"
        )


class VoxCPM:
    """A loaded VoxCPM model (+ optional LoRA structure) ready to synthesize speech."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._clips: dict[str, tuple[tuple, inference.Prompt | inference.Reference]] = {}  # kind -> last one

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        hf_model_id: str | None = None,
        lora_config: LoRAConfig | None = None,
        lora_weights_path: str | os.PathLike | Adapter | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        optimize: bool | None = True,
        load_denoiser: bool = False,
    ) -> VoxCPM:
        """Load a model directory or hub id (``path``, or ``hf_model_id``; neither: ``DEFAULT_MODEL_ID``) on
        ``device`` (default: CUDA if available, else CPU).

        ``dtype`` "auto" is the faster one for the device: on CPU bfloat16 where it has native bf16 dot
        products, else float32; on GPU the config's dtype (the VAE stays float32).
        ``lora_config`` builds the LoRA structure; ``lora_weights_path`` (a LoRA checkpoint folder, or an
        ``Adapter`` read already) also loads an adapter, its structure taken from its lora_config.json
        when ``lora_config`` is not given.
        ``optimize`` (default True, as upstream): on CPU, prepack weights for oneDNN
        (``inference.pack_for_cpu_generation``), which costs memory for a second, packed copy of those
        weights (float32: the local encoder and LocDiT; bfloat16: every linear; the README gives the sizes);
        on CUDA, compile the transformer stacks with torch.compile. ``None`` does the CPU part only and
        leaves CUDA uncompiled (the CLI's default); ``False`` runs the plain weights.
        """
        if load_denoiser:
            raise VoxCPMError("load_denoiser=True is not supported: voxcpm-tune has no denoiser; clean the prompt audio beforehand")
        if path is not None and hf_model_id is not None:
            raise VoxCPMError("from_pretrained: give the model as path or hf_model_id (exactly one of them)")
        model_dir = resolve_model_dir(path if path is not None else hf_model_id or DEFAULT_MODEL_ID)
        adapter = None if lora_weights_path is None else _read(lora_weights_path)
        if adapter is not None and lora_config is None:
            lora_config = _structure(adapter)
        elif adapter is not None and adapter.config is not None:
            _check_alpha({(lora_config.r, lora_config.alpha)}, adapter.config, adapter.path)
        tts = cls(load_model_dir(model_dir, lora=lora_config, device=device or "auto", dtype=dtype))
        if adapter is not None:
            lora.load_lora_state_dict(tts.model, adapter.tensors, strict=True)
        tts._optimize(optimize)
        return tts

    @classmethod
    def from_adapters(
        cls,
        adapters: Sequence[Adapter],
        model: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        optimize: bool | None = True,
    ) -> VoxCPM:
        """Load the model once to speak under each of ``adapters`` in turn (``load_lora``), the first loaded.

        ``adapters`` come from ``adapters.load_adapter`` (read and checked there, once); every one must
        share the first one's LoRA structure (rank, alpha, targets). ``model`` None means the adapters'
        common ``base_model``; none at all: the plain ``model``. The rest as in ``from_pretrained``.
        """
        settings = dict(device=device, dtype=dtype, optimize=optimize)
        if not adapters:
            if model is None:
                raise VoxCPMError(
                    "no model given: give model, or adapters whose lora_config.json names a base_model", param="model"
                )
            return cls.from_pretrained(model, **settings)
        first = adapters[0].lora_config()
        for adapter in adapters[1:]:
            structure = adapter.lora_config()
            if structure.structure() != first.structure():
                raise VoxCPMError(
                    f"{adapter.path}: its LoRA structure (r={structure.r}, alpha={structure.alpha}) differs from "
                    f"{adapters[0].path}'s (r={first.r}, alpha={first.alpha}) or targets other layers; adapters "
                    "swapped in one run must share rank, alpha and targets: render them in separate runs"
                )
        if model is None:
            bases = {adapter.path: resolve_base_model(adapter) for adapter in adapters}
            model = bases[adapters[0].path]
            other = next((path for path, base in bases.items() if base.resolve() != model.resolve()), None)
            if other is not None:
                raise VoxCPMError(
                    f"{other} names base model {bases[other]} but {adapters[0].path} names {model}; "
                    "give the base model as model",
                    param="model",
                )
        return cls.from_pretrained(model, lora_weights_path=adapters[0], **settings)

    @property
    def model(self):
        return self.loaded.model

    @property
    def sample_rate(self) -> int:
        """The rate of the generated audio (VoxCPM2: 48 kHz; prompts are read at the encoder's rate)."""
        return self.loaded.vae.out_sample_rate

    def _optimize(self, optimize: bool | None) -> None:
        m = self.model
        device = m.enc_to_lm_proj.weight.device.type
        use_cpu_kernels(m)  # how a CPU computes the same math (oneDNN, few-key attention); a no-op elsewhere
        if device == "cpu" and optimize is not False:
            inference.pack_for_cpu_generation(m)  # hot-swaps leave base weights alone; merges repack on the next call
        elif device == "cuda" and optimize:
            for module in (m.base_lm, m.residual_lm, m.feat_encoder, m.feat_decoder.estimator):
                module.compile(dynamic=True)  # in place: state-dict keys and LoRA hot-swapping are unaffected
        elif optimize:
            warnings.warn(f"optimize=True does nothing on {device}: running as is", stacklevel=3)

    # ---- generation -----------------------------------------------------------------------------

    def _clip(self, kind: str, path: str | os.PathLike, text: str | None, load):
        """An encoded prompt or reference; the last one of each kind is kept, so repeated calls with one
        voice encode it once."""
        path = Path(path).resolve()
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size, text)
        if kind not in self._clips or self._clips[kind][0] != key:
            self._clips[kind] = (key, load(path))
        return self._clips[kind][1]

    def _clips_for(
        self,
        prompt_wav_path: str | os.PathLike | None,
        prompt_text: str | None,
        reference_wav_path: str | os.PathLike | None,
    ) -> tuple[inference.Prompt | None, inference.Reference | None]:
        """The checked, encoded prompt and reference of one request (None where not given)."""
        inference.check_prompt_args(prompt_wav_path, prompt_text)
        inference.check_reference_args(self.model, reference_wav_path)
        vae, patch_size = self.loaded.vae, self.loaded.config.patch_size
        prompt = reference = None
        if prompt_wav_path is not None:
            prompt = self._clip("prompt", prompt_wav_path, prompt_text,
                                lambda p: inference.load_prompt(vae, p, prompt_text, patch_size))  # fmt: skip
        if reference_wav_path is not None:
            reference = self._clip("reference", reference_wav_path, None,
                                   lambda p: inference.load_reference(vae, p, patch_size))  # fmt: skip
        return prompt, reference

    def synthesize(
        self,
        text: str,
        prompt_wav_path: str | os.PathLike | None = None,
        prompt_text: str | None = None,
        seed: int | None = None,
        options: SamplingOptions | None = None,
        reference_wav_path: str | os.PathLike | None = None,
    ) -> inference.Generation:
        """``generate`` with the details: the wave plus the seed used, tries and patch count."""
        prompt, reference = self._clips_for(prompt_wav_path, prompt_text, reference_wav_path)
        m = self.loaded
        return inference.generate(m.model, m.vae, m.tokenizer, text, prompt, options, seed, reference)

    def generate(
        self,
        text: str,
        prompt_wav_path: str | os.PathLike | None = None,
        prompt_text: str | None = None,
        reference_wav_path: str | os.PathLike | None = None,
        cfg_value: float = SamplingOptions.cfg_value,
        inference_timesteps: int = SamplingOptions.inference_timesteps,
        min_len: int = SamplingOptions.min_len,
        max_len: int = SamplingOptions.max_len,
        seed: int | None = None,
        retry_badcase: bool = SamplingOptions.retry_badcase,
        retry_badcase_max_times: int = SamplingOptions.retry_badcase_max_times,
        retry_badcase_ratio_threshold: float = SamplingOptions.retry_badcase_ratio_threshold,
    ) -> np.ndarray:
        """Speech for ``text`` as float32 [samples] at ``sample_rate`` (only the new speech with a prompt).

        ``prompt_wav_path`` + ``prompt_text``: continue that recording. ``reference_wav_path`` (VoxCPM2):
        speak in that clip's voice, no transcript needed; with a prompt too, both. A parenthesised
        description before the text (``"(A warm, gentle voice)Hello."``) designs or steers the voice.
        The sampling arguments default to ``SamplingOptions``' fields (the reference's defaults).
        """
        options = SamplingOptions(
            cfg_value, inference_timesteps, min_len, max_len,
            retry_badcase, retry_badcase_max_times, retry_badcase_ratio_threshold,
        )  # fmt: skip
        return self.synthesize(text, prompt_wav_path, prompt_text, seed, options, reference_wav_path).wav

    def generate_streaming(
        self,
        text: str,
        prompt_wav_path: str | os.PathLike | None = None,
        prompt_text: str | None = None,
        reference_wav_path: str | os.PathLike | None = None,
        cfg_value: float = SamplingOptions.cfg_value,
        inference_timesteps: int = SamplingOptions.inference_timesteps,
        min_len: int = SamplingOptions.min_len,
        max_len: int = SamplingOptions.max_len,
        seed: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield float32 chunks, one per generated patch; together they equal ``generate`` in every mode
        (no bad-case retry)."""
        options = SamplingOptions(cfg_value, inference_timesteps, min_len, max_len, retry_badcase=False)
        prompt, reference = self._clips_for(prompt_wav_path, prompt_text, reference_wav_path)  # checked now
        m = self.loaded
        return inference.generate_streaming(m.model, m.vae, m.tokenizer, text, prompt, options, seed, reference)

    # ---- LoRA hot-swapping ----------------------------------------------------------------------

    @property
    def lora_enabled(self) -> bool:
        """Whether LoRA adapters are active: False without a LoRA structure or after ``set_lora_enabled(False)``."""
        return lora.lora_is_enabled(self.model)

    def load_lora(self, path: str | os.PathLike | Adapter) -> tuple[list[str], list[str]]:
        """Load the adapter of a LoRA checkpoint folder (or an ``Adapter`` read already) in place
        -> (loaded keys, skipped keys).

        A model loaded without LoRA gets the adapter's structure first. An adapter whose rank, targets,
        shapes or saved alpha differ from the model's LoRA structure is an error, never a partial load.
        """
        adapter = _read(path)
        layers = {(m.r, m.alpha) for _, m in lora.lora_modules(self.model)}
        if not layers:
            lora.apply_lora(self.model, _structure(adapter))
            use_cpu_kernels(self.model)  # the new LoRA layers' base products, as the linears they wrap
        elif adapter.config is not None:
            _check_alpha(layers, adapter.config, adapter.path)
        return lora.load_lora_state_dict(self.model, adapter.tensors, strict=True)

    def unload_lora(self) -> None:
        """Reset every adapter to a zero update: outputs equal the base model's."""
        lora.reset_lora(self.model)

    def set_lora_enabled(self, enabled: bool) -> None:
        """Switch the adapters off (base model) or back on, keeping their weights."""
        lora.set_lora_enabled(self.model, enabled)

    def get_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the current ``*.lora_A`` / ``*.lora_B`` tensors (empty without LoRA)."""
        return lora.lora_state_dict(self.model)
