"""Typed model configuration: the official ``config.json`` of a VoxCPM model directory.

Unknown keys are ignored (later releases add fields); impossible values are rejected with a
message that names the key. ``config_error`` is how every typed config (this one, the training
YAML, LoRA options) turns a pydantic error into one ``VoxCPMError`` line.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from voxcpm_core.errors import VoxCPMError


class _Config(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class RopeScaling(_Config):
    type: str = "longrope"
    long_factor: list[float]
    short_factor: list[float]
    original_max_position_embeddings: int = Field(gt=0)


class LMConfig(_Config):
    """One MiniCPM4 block stack (``lm_config``); the local stacks reuse it with fields replaced."""

    bos_token_id: int = 1
    eos_token_id: int = 2
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_hidden_layers: int = Field(ge=0)
    num_key_value_heads: int = Field(gt=0)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    vocab_size: int = Field(default=73448, ge=0)
    use_mup: bool = True
    scale_emb: float = 1.0
    dim_model_base: int | None = None
    scale_depth: float = 1.0
    kv_channels: int | None = None
    no_rope: bool = False

    @model_validator(mode="after")
    def _check_heads(self) -> LMConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless kv_channels is set"
            )
        if self.rope_scaling is not None and not self.no_rope:
            half = self.head_dim // 2
            for name in ("long_factor", "short_factor"):
                got = len(getattr(self.rope_scaling, name))
                if got != half:
                    raise ValueError(f"rope_scaling.{name} has {got} entries, expected head_dim/2 = {half}")
        return self

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def residual_scale(self) -> float:
        """muP depth scaling of each residual branch (1 without muP)."""
        if not self.use_mup or self.num_hidden_layers == 0:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)


class CFMConfig(_Config):
    sigma_min: float = 1e-6
    solver: Literal["euler"] = "euler"
    t_scheduler: Literal["log-norm", "uniform"] = "log-norm"
    training_cfg_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    inference_cfg_rate: float = 1.0
    reg_loss_type: str = "l1"
    ratio_r_neq_t_range: tuple[float, float] = (0.25, 0.75)
    noise_cond_prob_range: tuple[float, float] = (0.0, 0.0)
    noise_cond_scale: float = 0.0


class LocalStackConfig(_Config):
    """``encoder_config`` / ``dit_config``: size of a local (per-patch) transformer."""

    hidden_dim: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_layers: int = Field(ge=0)
    kv_channels: int | None = None


class DiTConfig(LocalStackConfig):
    cfm_config: CFMConfig = Field(default_factory=CFMConfig)


class _AudioVAEFields(_Config):
    """What both VAE generations share; their decoders and default sizes differ."""

    encoder_dim: int = Field(default=128, gt=0)
    encoder_rates: list[int] = Field(default_factory=lambda: [2, 5, 8, 8], min_length=1)
    latent_dim: int = Field(default=64, gt=0)
    decoder_dim: int = Field(default=1536, gt=0)
    decoder_rates: list[int] = Field(default_factory=lambda: [8, 8, 5, 2], min_length=1)
    depthwise: bool = True
    sample_rate: int = Field(default=16000, gt=0)  # the ENCODER's input rate
    use_noise_block: bool = False

    @property
    def hop_length(self) -> int:
        """Encoder input samples per latent frame."""
        return math.prod(self.encoder_rates)

    @property
    def decode_hop_length(self) -> int:
        """Decoder output samples per latent frame."""
        return math.prod(self.decoder_rates)


class AudioVAEConfig(_AudioVAEFields):
    """AudioVAE V1 (VoxCPM-0.5B, VoxCPM1.5): one rate in and out."""

    @property
    def out_sample_rate(self) -> int:
        return self.sample_rate


class AudioVAEConfigV2(_AudioVAEFields):
    """AudioVAE V2 (VoxCPM2): encodes at ``sample_rate``, decodes at ``out_sample_rate`` under a sample-rate
    condition (per-channel scale and bias before each decoder block, one row per rate bucket)."""

    decoder_dim: int = Field(default=2048, gt=0)
    decoder_rates: list[int] = Field(default_factory=lambda: [8, 6, 5, 2, 2, 2], min_length=1)
    out_sample_rate: int = Field(default=48000, gt=0)
    sr_bin_boundaries: list[int] | None = Field(default_factory=lambda: [20000, 30000, 40000])
    cond_type: Literal["scale_bias", "scale_bias_init", "add", "concat"] = "scale_bias"
    cond_dim: int = Field(default=128, gt=0)
    cond_out_layer: bool = False

    @model_validator(mode="after")
    def _check_cond(self) -> AudioVAEConfigV2:
        if self.cond_type == "concat" and not self.cond_out_layer and self.sr_bin_boundaries is not None:
            raise ValueError("cond_type 'concat' needs cond_out_layer: true (it maps the widened channels back)")
        return self


class VoxCPMConfig(_Config):
    """The whole model: ``config.json`` of a VoxCPM-0.5B / VoxCPM1.5 directory."""

    architecture: str = "voxcpm"
    lm_config: LMConfig
    patch_size: int = Field(default=2, gt=0)
    feat_dim: int = Field(default=64, gt=0)
    residual_lm_num_layers: int = Field(default=6, ge=0)
    scalar_quantization_latent_dim: int = Field(default=256, gt=0)
    scalar_quantization_scale: int = Field(default=9, gt=0)
    encoder_config: LocalStackConfig
    dit_config: DiTConfig
    audio_vae_config: AudioVAEConfig = Field(default_factory=AudioVAEConfig)
    max_length: int = Field(default=4096, gt=0)
    device: str = "cuda"
    dtype: str = "bfloat16"
    dit_mean_mode: bool = False

    @model_validator(mode="after")
    def _check(self) -> VoxCPMConfig:
        if self.audio_vae_config.latent_dim != self.feat_dim:
            raise ValueError(
                f"feat_dim ({self.feat_dim}) must equal audio_vae_config.latent_dim "
                f"({self.audio_vae_config.latent_dim})"
            )
        for name in ("encoder_config", "dit_config"):
            try:
                self.local_lm_config(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self

    def local_lm_config(self, stack: LocalStackConfig) -> LMConfig:
        """``lm_config`` with a local stack's sizes swapped in (kv heads stay the LM's)."""
        try:
            return LMConfig.model_validate(
                self.lm_config.model_dump()
                | dict(
                    hidden_size=stack.hidden_dim,
                    intermediate_size=stack.ffn_dim,
                    num_attention_heads=stack.num_heads,
                    num_hidden_layers=stack.num_layers,
                    kv_channels=stack.kv_channels,
                    vocab_size=0,
                )
            )
        except ValidationError as exc:
            raise ValueError(_problem(exc.errors()[0])) from None

    @property
    def residual_lm_config(self) -> LMConfig:
        return self.lm_config.model_copy(update=dict(num_hidden_layers=self.residual_lm_num_layers, vocab_size=0))

    @property
    def encoder_lm_config(self) -> LMConfig:
        return self.local_lm_config(self.encoder_config)

    @property
    def dit_lm_config(self) -> LMConfig:
        return self.local_lm_config(self.dit_config)

    @property
    def sample_rate(self) -> int:
        """The rate audio is read at (the VAE encoder's)."""
        return self.audio_vae_config.sample_rate

    @property
    def out_sample_rate(self) -> int:
        """The rate of generated audio (the VAE decoder's)."""
        return self.audio_vae_config.out_sample_rate

    @property
    def hop_length(self) -> int:
        return self.audio_vae_config.hop_length

    @property
    def patch_samples(self) -> int:
        """Input waveform samples per LM token (one patch of ``patch_size`` latent frames)."""
        return self.hop_length * self.patch_size

    @property
    def out_patch_samples(self) -> int:
        """Generated waveform samples per LM token."""
        return self.audio_vae_config.decode_hop_length * self.patch_size


class DiTConfigV2(DiTConfig):
    dit_mean_mode: bool = False  # read here in V2; the release's "mean_mode" is not a field and is ignored


class VoxCPM2Config(VoxCPMConfig):
    """``config.json`` of a VoxCPM2 directory: V1's keys with other defaults, a residual LM that may drop
    RoPE, the mean mode inside ``dit_config`` and the V2 audio VAE."""

    architecture: str = "voxcpm2"
    patch_size: int = Field(default=4, gt=0)
    residual_lm_num_layers: int = Field(default=8, ge=0)
    scalar_quantization_latent_dim: int = Field(default=512, gt=0)
    max_length: int = Field(default=8192, gt=0)
    residual_lm_no_rope: bool = False
    dit_config: DiTConfigV2
    audio_vae_config: AudioVAEConfigV2 = Field(default_factory=AudioVAEConfigV2)

    @property
    def residual_lm_config(self) -> LMConfig:
        return super().residual_lm_config.model_copy(update=dict(no_rope=self.residual_lm_no_rope))


def _parse(model: type[VoxCPMConfig], data: dict, source: str) -> VoxCPMConfig:
    """Validate a config dict; any problem becomes one ``VoxCPMError`` line naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, source, model, what="model config key") from None


def parse_model_config(data: dict, source: str = "config.json") -> VoxCPMConfig:
    return _parse(VoxCPMConfig, data, source)


def parse_model2_config(data: dict, source: str = "config.json") -> VoxCPM2Config:
    return _parse(VoxCPM2Config, data, source)


# ---------------------------------------------------------------------------------------------- errors


def config_keys(model: type[BaseModel]) -> dict[str, Any]:
    """Key as written in a file (a field's alias, when it has one) -> the field's annotation."""
    return {(f.alias or name): f.annotation for name, f in model.model_fields.items()}


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``M`` or ``M | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = nested_model(arg)
            if found is not None:
                return found
    return None


def unknown_key_error(
    source: str, key_path: Sequence[str], known: Iterable[str], what: str = "key"
) -> VoxCPMError:
    """``SOURCE: unknown key 'a.b'; did you mean 'a.c'?`` (the known keys when none is close)."""
    known = list(known)
    close = difflib.get_close_matches(key_path[-1], known, n=1, cutoff=0.6)
    prefix = "".join(f"{part}." for part in key_path[:-1])
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known options: {', '.join(known)}"
    return VoxCPMError(f"{source}: unknown {what} '{'.'.join(key_path)}'; {hint}")


def _problem(err: ErrorDetails, what: str | None = None) -> str:
    """``KEY: what is wrong (got VALUE)``, or ``invalid WHAT 'KEY': ...`` when the keys have a name."""
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "missing":
        return f"missing {what} '{key}'" if what else f"{key}: missing"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error":  # our own validators' messages quote the values already
        message += f" (got {err.get('input')!r})"
    if not key:
        return message
    return f"invalid {what} '{key}': {message}" if what else f"{key}: {message}"


def config_error(
    exc: ValidationError,
    source: str,
    model: type[BaseModel],
    what: str | None = None,
    fix: str = "",
    param: str | None = None,
) -> VoxCPMError:
    """The first error of ``exc`` as one line: ``source``, the key path, what is wrong and the value given.

    An unknown key (``extra="forbid"``) gets a "did you mean"; ``fix`` (``{key}`` is filled in) says how
    to set a missing or wrong value, and ``param`` is then the API parameter it goes through
    (``VoxCPMError.param``); ``what`` names the keys ("LoRA option"), else they read as YAML.
    """
    err = exc.errors()[0]
    key_path = [str(part) for part in err["loc"]]
    if err["type"] == "extra_forbidden":
        for part in key_path[:-1]:
            model = nested_model(config_keys(model)[part])
        return unknown_key_error(source, key_path, config_keys(model), what or "key")
    hint = f"; {fix.format(key='.'.join(key_path))}" if fix and err["type"] != "value_error" else ""
    return VoxCPMError(f"{source}: {_problem(err, what)}{hint}", param=param if hint else None)
