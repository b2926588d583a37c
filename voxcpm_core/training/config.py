"""The training YAML (the fine-tuning guide's schema plus our keys) as typed, validated objects.

``load_train_config(path, overrides)`` reads the YAML, applies ``--set key=value`` overrides and
validates. Rules a user can rely on:

- Unknown keys are errors at any level (``lora.rank`` -> "did you mean 'lora.r'?").
- Relative paths written in the YAML resolve against the YAML file's folder, so a config and its
  data can move together; relative paths given with ``--set`` resolve against the current folder.
- ``val_manifest: ""`` (or omitted) means no validation; ``tensorboard: ""`` turns TensorBoard off,
  omitted means ``<save_path>/tensorboard``; ``max_steps`` omitted means ``num_iters``.
- ``sample_rate`` omitted means the model's VAE rate; any other value is an error
  (``check_sample_rate``, called once the model config is known).
- ``demo: <folder>`` builds the bundled demo (tiny model + small dataset) there on first load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from voxcpm_core.config import VoxCPMConfig, config_error, config_keys, nested_model, unknown_key_error
from voxcpm_core.data.pipeline import DataSpec
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.models.lora import LoRAConfig

# Keys whose values are filesystem paths (resolved as described in the module docstring).
PATH_KEYS = (
    "pretrained_path",
    "train_manifest",
    "val_manifest",
    "save_path",
    "tensorboard",
    "cache_dir",
    "demo",
)


def default_cache_dir() -> Path:
    """Latent cache root: ``$VOXCPM_CACHE_DIR/latents``, else ``~/.cache/voxcpm-tune/latents``."""
    root = os.environ.get("VOXCPM_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "voxcpm-tune") / "latents"


class LossWeights(BaseModel):
    """``lambdas``: total loss = loss/diff * diff + loss/stop * stop."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    diff: float = Field(1.0, alias="loss/diff", ge=0)
    stop: float = Field(1.0, alias="loss/stop", ge=0)

    def as_dict(self) -> dict[str, float]:
        return {"loss/diff": self.diff, "loss/stop": self.stop}


class TrainConfig(BaseModel):
    """One training run. Field order and names follow the guide; ours come last."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    pretrained_path: Path | None = None  # model directory; required unless hf_model_id is given
    train_manifest: Path
    val_manifest: Path | None = None  # "" = no validation
    sample_rate: int | None = Field(None, gt=0)  # must equal the model's VAE encoder rate; omitted = that rate
    out_sample_rate: int | None = Field(None, gt=0)  # accepted from reference V2 configs; samples use the model's output rate
    batch_size: int = Field(16, gt=0)  # at most this many clips per micro-batch
    grad_accum_steps: int = Field(1, gt=0)
    num_workers: int = Field(2, ge=0)  # DataLoader workers reading cached latents
    num_iters: int = Field(2000, gt=0)  # optimizer steps to run
    log_interval: int = Field(10, gt=0)
    valid_interval: int = Field(1000, ge=0)  # 0 = never
    save_interval: int = Field(1000, ge=0)  # 0 = only at the end
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int | None = Field(None, gt=0)  # end of the cosine schedule; omitted = num_iters
    max_batch_tokens: int = Field(8192, ge=0)  # padded positions per micro-batch; 0 = no budget
    save_path: Path
    tensorboard: Path | None = None  # omitted = <save_path>/tensorboard, "" = off
    lambdas: LossWeights = Field(default_factory=LossWeights)
    lora: LoRAConfig | None = None  # the adapter for `voxcpm train lora`
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    hf_model_id: str = ""  # Hugging Face id, used when pretrained_path is empty
    distribute: bool = False  # publish: the adapter's lora_config.json names hf_model_id as its base_model
    keep_last_n: int = Field(3, ge=0)  # step_* checkpoints kept; 0 = keep all
    seed: int = 1234
    precision: Literal["fp32", "bf16", "auto"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    cache_dir: Path = Field(default_factory=default_cache_dir)  # latent cache root
    gradient_checkpointing: bool = False
    demo: Path | None = None  # build the bundled demo here on first load

    _source: str = PrivateAttr("<config>")

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("val_manifest", "pretrained_path", "demo"):
                if data.get(key) in ("", None):
                    data.pop(key, None)
            if data.get("tensorboard") == "":
                data["tensorboard"] = None
            elif data.get("tensorboard") is None and data.get("save_path") not in (None, ""):
                data["tensorboard"] = Path(data["save_path"]) / "tensorboard"
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.pretrained_path is None and not self.hf_model_id:
            raise ValueError("pretrained_path: missing; set it to a model directory (or set hf_model_id)")
        if self.distribute and not self.hf_model_id:
            raise ValueError(
                "distribute: true names hf_model_id as the adapter's base_model, but hf_model_id is empty; set "
                "hf_model_id: openbmb/VoxCPM2 (the id the base is published under), or distribute: false"
            )
        if self.max_steps is None:
            self.max_steps = self.num_iters
        return self

    @property
    def source(self) -> str:
        """The YAML file this config came from (for error messages)."""
        return self._source

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``--dry-run`` prints and a run saves); it loads back as is."""
        data = self.model_dump(mode="json", by_alias=True)
        data |= {key: "" for key in PATH_KEYS if data[key] is None}  # "" = off; null would mean the default
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def check_sample_rate(cfg: TrainConfig, model_config: VoxCPMConfig) -> int:
    """The rate to train at: the model's VAE encoder rate; a different ``sample_rate`` in the YAML is an error
    (VoxCPM2 reads audio at 16 kHz and speaks at 48 kHz: 48000 there would encode garbage)."""
    model_rate, out_rate = model_config.sample_rate, model_config.out_sample_rate
    if cfg.sample_rate is not None and cfg.sample_rate != model_rate:
        rates = (
            f"the model's VAE encoder rate is {model_rate} (training audio is read at it) and {out_rate} is its "
            "output rate (out_sample_rate)"
            if out_rate != model_rate
            else f"the model's VAE rate is {model_rate}"
        )
        raise VoxCPMError(
            f"{cfg.source}: sample_rate: {cfg.sample_rate} does not match the model ({cfg.pretrained_path or cfg.hf_model_id}): "
            f"{rates}; set sample_rate: {model_rate} or remove the key (audio is resampled)"
        )
    return model_rate


def data_spec(cfg: TrainConfig, model_config: VoxCPMConfig) -> DataSpec:
    """What ``prepare_training_data`` takes from ``cfg``, at the model's rate (``check_sample_rate``)."""
    return DataSpec(
        train_manifest=cfg.train_manifest,
        val_manifest=cfg.val_manifest,
        cache_dir=cfg.cache_dir,
        sample_rate=check_sample_rate(cfg, model_config),
        batch_size=cfg.batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        grad_accum_steps=cfg.grad_accum_steps,
        seed=cfg.seed,
        source=cfg.source,
    )


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML, apply ``overrides`` (``KEY=VALUE``: the CLI's ``--set``), validate; errors are one line."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise VoxCPMError(f"{source}: config file not found; pass an existing YAML, e.g. conf/demo/lora.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise VoxCPMError(f"{where}: invalid YAML ({problem}); fix the syntax at that line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VoxCPMError(f"{source}: cannot read config ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise VoxCPMError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    _check_keys(raw, TrainConfig, [], source)
    _resolve_paths(raw, path.resolve().parent)
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error(
            exc, source, TrainConfig, fix="set '{key}: ...' in the YAML or override {key}=...", param="overrides"
        ) from None
    cfg._source = source
    if cfg.demo is not None:
        from voxcpm_core.dev.demo import ensure_demo  # builds a model: only when the config asks for it

        ensure_demo(cfg.demo)
    return cfg


def _check_keys(data: dict, model: type[BaseModel], where: list[str], source: str) -> None:
    known = config_keys(model)
    for key, value in data.items():
        if key not in known:
            raise unknown_key_error(source, [*where, str(key)], known)
        sub = nested_model(known[key])
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, [*where, key], source)


def _resolve_paths(raw: dict, base: Path, keys: tuple[str, ...] = PATH_KEYS) -> None:
    """Make the path keys of ``raw`` absolute against ``base`` ("" and null stay as they are)."""
    for key in keys:
        value = raw.get(key)
        if isinstance(value, (str, Path)) and str(value) != "":
            raw[key] = str((base / Path(value).expanduser()).resolve())


def _override_error(item: str, problem: str) -> VoxCPMError:
    return VoxCPMError(f"override {item!r}: {problem}", param="overrides")


def _apply_override(raw: dict, item: str) -> None:
    """``lora.r=16``: value parsed as a YAML scalar; unknown keys are did-you-mean errors."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _override_error(item, "expected KEY=VALUE, e.g. lora.r=16 or batch_size=8")
    key_path = key.split(".")
    model: type[BaseModel] | None = TrainConfig
    for depth, part in enumerate(key_path):
        if model is None:
            raise _override_error(item, f"'{'.'.join(key_path[:depth])}' has no sub-keys")
        known = config_keys(model)
        if part not in known:
            error = unknown_key_error(f"override {item}", key_path[: depth + 1], known)
            error.param = "overrides"
            raise error
        model = nested_model(known[part])
    if model is not None:
        raise _override_error(
            item, f"'{key}' is a section; set one of its keys, e.g. {key}.{next(iter(config_keys(model)))}=..."
        )
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: take the text as a string (pydantic still checks its type)
    node = raw
    for part in key_path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key_path[-1]] = value
    if key in PATH_KEYS:
        _resolve_paths(node, Path.cwd(), keys=(key,))
