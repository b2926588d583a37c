"""Everything that knows file names, key names and on-disk formats of model and LoRA directories.

A model directory: ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``), ``audiovae.pth``
(or ``audiovae.safetensors``), tokenizer files. A LoRA directory: ``lora_weights.safetensors`` (or
``lora_weights.ckpt``) and ``lora_config.json``. Weights load with one exact key check; writes go
to a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from voxcpm_core.config import VoxCPMConfig
from voxcpm_core.cpu import capability
from voxcpm_core.data.tokenizer import TextTokenizer
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.families import family_of, parse_config
from voxcpm_core.io.atomic import atomic_dir
from voxcpm_core.models.audio_vae import AudioVAE
from voxcpm_core.models.lora import LoRAConfig, apply_lora, parse_lora_config
from voxcpm_core.models.voxcpm import VoxCPMModel

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
VAE_FILES = ("audiovae.pth", "audiovae.safetensors")
LORA_FILES = ("lora_weights.safetensors", "lora_weights.ckpt")
LORA_CONFIG_FILE = "lora_config.json"
LORA_SUFFIXES = (".lora_A", ".lora_B")
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def _require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise VoxCPMError(f"{path}: {what} not found (expected a directory)")
    return path


def _find_file(folder: Path, candidates: tuple[str, ...], what: str) -> Path:
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise VoxCPMError(f"{folder}: no {what} found (expected {' or '.join(candidates)})")


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VoxCPMError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise VoxCPMError(f"{path}: expected a JSON object at the top level")
    return data


def read_config_dict(model_dir: Path) -> dict:
    """The raw ``config.json`` of a model directory (unknown keys kept, for saving back)."""
    path = _require_dir(model_dir, "model directory") / CONFIG_FILE
    if not path.is_file():
        raise VoxCPMError(
            f"{path}: missing; a model directory needs config.json, model weights and audiovae weights"
        )
    return _read_json_object(path)


def read_model_config(model_dir: Path) -> VoxCPMConfig:
    """Parse and validate ``<model_dir>/config.json`` (by the config model of its architecture)."""
    return parse_config(read_config_dict(model_dir), source=str(Path(model_dir) / CONFIG_FILE))


def load_tokenizer(model_dir: Path) -> TextTokenizer:
    """The model's text tokenizer from ``tokenizer.json`` (+ ``tokenizer_config.json`` added tokens)."""
    model_dir = _require_dir(model_dir, "model directory")
    tokenizer_json = model_dir / TOKENIZER_FILES[0]
    if not tokenizer_json.is_file():
        raise VoxCPMError(f"{tokenizer_json}: missing; copy the tokenizer files from the released model")
    return TextTokenizer.from_files(tokenizer_json, model_dir / TOKENIZER_FILES[1])


# ---------------------------------------------------------------------------------------------- tensors


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (``.bin/.pth/.pt/.ckpt``, maybe ``{"state_dict": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise VoxCPMError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise VoxCPMError(
                f"{path}: unreadable safetensors file ({_first_line(exc)}); the file is corrupt or truncated, copy it again"
            ) from None
    if path.suffix not in TORCH_SUFFIXES:
        raise VoxCPMError(
            f"{path}: unknown weights format; expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean the same thing here
        raise VoxCPMError(
            f"{path}: unreadable torch checkpoint ({type(exc).__name__}: {_first_line(exc)}); the file is corrupt or not a weights file"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise VoxCPMError(f"{path}: expected a dict of named tensors (optionally under 'state_dict')")
    return data


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    return shown + (f" ... ({len(keys) - 5} more)" if len(keys) > 5 else "")


def _load_exact(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path, may_miss: tuple[str, ...] = ()
) -> None:
    """Load ``state_dict`` into ``module`` with an exact key and shape check (keys ending in ``may_miss`` may be absent)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(may_miss)]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = [f"missing {len(missing)} key(s): {_list_keys(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} key(s): {_list_keys(unexpected)}"] if unexpected else []
        raise VoxCPMError(
            f"{source}: weights do not match config.json ({'; '.join(parts)}); use the weights and config of the same model"
        )
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise VoxCPMError(
                f"{source}: {key} has shape {list(tensor.shape)} but config.json implies {list(expected[key].shape)}; "
                "use the weights and config of the same model"
            )
    module.load_state_dict(state_dict, strict=False)


# ---------------------------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A model directory in memory: parsed and raw config, the network, its VAE and tokenizer."""

    config: VoxCPMConfig
    config_dict: dict
    model: VoxCPMModel
    vae: AudioVAE
    tokenizer: TextTokenizer
    path: Path

    def save(self, out_dir: Path, overwrite: bool = False) -> Path:
        """Write this model as a model directory (tokenizer files copied from ``path``)."""
        return save_model_dir(out_dir, self.model, self.vae, self.config_dict, self.path, overwrite=overwrite)


def torch_dtype(name: torch.dtype | str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; only floating-point dtypes are accepted."""
    resolved = name if isinstance(name, torch.dtype) else getattr(torch, str(name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise VoxCPMError(
            f"dtype {name!r} is not a floating-point torch dtype; use float32, bfloat16 or float16", param="dtype"
        )
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, config: VoxCPMConfig) -> torch.dtype:
    """An explicit dtype as given; None: float32 on CPU (exact: training, merging, saving), the config's
    dtype (bf16 for releases) elsewhere; "auto" (generation): the same, except bfloat16 on CPUs with native
    bf16 dot products, where it generates about twice as fast (emulated bf16 is slower than float32)."""
    if dtype == "auto" and device.type == "cpu" and capability.cpu().native_bf16:
        return torch.bfloat16
    if dtype is None or dtype == "auto":
        dtype = "float32" if device.type == "cpu" else config.dtype
    return torch_dtype(dtype)


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise VoxCPMError(
            f"device {device!r} is not valid ({_first_line(exc)}); use auto, cpu, cuda or mps", param="device"
        ) from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(resolved.type)
    if available is not None and not available():
        raise VoxCPMError(
            f"device {str(device)!r} is not available here (torch {torch.__version__} sees no {resolved.type.upper()} "
            "device); use device cpu or auto",
            param="device",
            value="cpu",
        )
    return resolved


def load_audio_vae(model_dir: Path, config: VoxCPMConfig, device: torch.device | str = "cpu") -> AudioVAE:
    """The model's audio VAE (``audiovae.pth`` or ``audiovae.safetensors``), float32, eval mode."""
    model_dir = _require_dir(model_dir, "model directory")
    path = _find_file(model_dir, VAE_FILES, "audio VAE weights")
    vae = family_of(config).build_vae(config)
    _load_exact(vae, load_state_dict_file(path), path)
    return vae.to(device=resolve_device(device), dtype=torch.float32).eval()


def load_model_dir(
    model_dir: Path,
    lora: LoRAConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a model directory; with ``lora`` the adapters are added first (only their keys may be missing)."""
    model_dir = _require_dir(model_dir, "model directory")
    config_dict = read_config_dict(model_dir)
    config = parse_config(config_dict, source=str(model_dir / CONFIG_FILE))
    tokenizer = load_tokenizer(model_dir)
    weights_path = _find_file(model_dir, MODEL_FILES, "model weights")
    _find_file(model_dir, VAE_FILES, "audio VAE weights")  # fail before the (slow) model load
    device = resolve_device(device)
    model = family_of(config).network(config)
    if lora is not None:
        apply_lora(model, lora)
    _load_exact(model, load_state_dict_file(weights_path), weights_path, may_miss=LORA_SUFFIXES)
    resolved = resolve_dtype(dtype, device, config)
    if resolved == torch.bfloat16 and device.type == "cpu" and (notice := capability.bf16_emulation_notice("dtype bfloat16")):
        warnings.warn(f"{notice}; dtype auto picks the faster one", stacklevel=2)
    model = model.to(device=device, dtype=resolved).eval()
    vae = load_audio_vae(model_dir, config, device)
    return LoadedModel(config, config_dict, model, vae, tokenizer, model_dir)


def _cpu_tensors(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    return {
        k: v.detach()
        .to(device="cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        .contiguous()
        for k, v in tensors.items()
    }


def write_model_files(
    folder: Path,
    model: VoxCPMModel,
    vae: AudioVAE,
    config_dict: dict,
    tokenizer_dir: Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a model directory's files into an existing ``folder`` (not atomic: see ``save_model_dir``).

    ``model.safetensors`` holds every non-VAE, non-LoRA weight in ``dtype`` (default: the config's
    dtype; training checkpoints keep float32 so a resume is exact); ``audiovae.pth``
    the VAE as ``{"state_dict": ...}`` in float32; the tokenizer files are copied from ``tokenizer_dir``.
    """
    folder, tokenizer_dir = Path(folder), Path(tokenizer_dir)
    if not (tokenizer_dir / TOKENIZER_FILES[0]).is_file():
        raise VoxCPMError(f"{tokenizer_dir}: no {TOKENIZER_FILES[0]} to copy into the model directory")
    config = parse_config(config_dict, source="config")
    dtype = dtype or torch_dtype(config.dtype)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith(LORA_SUFFIXES)}
    (folder / CONFIG_FILE).write_text(
        json.dumps(config_dict, indent=4, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    save_file(_cpu_tensors(weights, dtype), folder / MODEL_FILES[0])
    torch.save({"state_dict": _cpu_tensors(vae.state_dict(), torch.float32)}, folder / VAE_FILES[0])
    if tokenizer_dir.resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, folder / name)


def read_model_weights(model_dir: Path, keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The non-VAE weights of a model directory as stored (dtype kept); only ``keys`` when given (those present).

    From a ``model.safetensors`` only the asked tensors are read, so a few layers of a large model are cheap.
    """
    path = _find_file(_require_dir(model_dir, "model directory"), MODEL_FILES, "model weights")
    if keys is None or path.suffix != ".safetensors":
        weights = load_state_dict_file(path)
        return weights if keys is None else {k: weights[k] for k in keys if k in weights}
    try:
        with safe_open(path, framework="pt") as f:
            present = set(f.keys())
            return {k: f.get_tensor(k) for k in keys if k in present}
    except (SafetensorError, OSError) as exc:
        raise VoxCPMError(
            f"{path}: unreadable safetensors file ({_first_line(exc)}); the file is corrupt or truncated, copy it again"
        ) from None


def save_model_dir_like(
    out_dir: Path, like_dir: Path, weights: Mapping[str, torch.Tensor], overwrite: bool = False
) -> Path:
    """Atomically write a model directory that is ``like_dir`` with its non-VAE weights replaced by ``weights``.

    ``model.safetensors`` holds ``weights`` as given (dtype kept); config.json, the audio VAE file and the
    tokenizer files are byte copies of ``like_dir``'s.
    """
    like_dir = _require_dir(like_dir, "model directory")
    copies = [like_dir / CONFIG_FILE, _find_file(like_dir, VAE_FILES, "audio VAE weights")]
    copies += [like_dir / name for name in TOKENIZER_FILES if (like_dir / name).is_file()]
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(_cpu_tensors(weights), tmp / MODEL_FILES[0])
        for source in copies:
            shutil.copyfile(source, tmp / source.name)
    return Path(out_dir)


def save_model_dir(
    out_dir: Path,
    model: VoxCPMModel,
    vae: AudioVAE,
    config_dict: dict,
    tokenizer_dir: Path,
    overwrite: bool = False,
) -> Path:
    """Write a complete, loadable model directory atomically; loading it back gives identical tensors."""
    with atomic_dir(out_dir, overwrite) as tmp:
        write_model_files(tmp, model, vae, config_dict, tokenizer_dir)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- LoRA


def lora_weights_file(lora_dir: Path) -> Path:
    """The weights file of a LoRA checkpoint directory (``lora_weights.safetensors`` or ``.ckpt``)."""
    return _find_file(_require_dir(lora_dir, "LoRA checkpoint directory"), LORA_FILES, "LoRA weights")


def load_lora_dir(lora_dir: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(adapter tensors, the ``lora_config.json`` object or None) of a LoRA checkpoint directory."""
    lora_dir = Path(lora_dir)
    state_dict = load_state_dict_file(lora_weights_file(lora_dir))
    meta_path = lora_dir / LORA_CONFIG_FILE
    if not meta_path.is_file():
        return state_dict, None
    meta = _read_json_object(meta_path)
    if not isinstance(meta.get("lora_config"), dict):
        raise VoxCPMError(
            f"{meta_path}: expected a 'lora_config' object (and 'base_model'); rewrite it or delete it to use the defaults"
        )
    parse_lora_config(meta["lora_config"], source=str(meta_path))  # fail early on a bad config
    return state_dict, meta


def write_lora_files(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    lora_config: LoRAConfig,
    base_model: str | os.PathLike | None,
) -> None:
    """Write ``lora_weights.safetensors`` (only LoRA tensors) and ``lora_config.json`` into an existing folder."""
    folder = Path(folder)
    tensors = {k: v for k, v in state_dict.items() if k.endswith(LORA_SUFFIXES)}
    save_file(_cpu_tensors(tensors), folder / LORA_FILES[0])
    meta = {
        "base_model": None if base_model is None else str(base_model),
        "lora_config": lora_config.model_dump(),
    }
    (folder / LORA_CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def save_lora_dir(
    out_dir: Path,
    state_dict: Mapping[str, torch.Tensor],
    lora_config: LoRAConfig,
    base_model: str | os.PathLike | None,
    overwrite: bool = False,
) -> Path:
    """Write a LoRA checkpoint directory atomically, in the reference layout."""
    with atomic_dir(out_dir, overwrite) as tmp:
        write_lora_files(tmp, state_dict, lora_config, base_model)
    return Path(out_dir)
