"""What a LoRA checkpoint folder holds, and whether it fits a base model: ``voxcpm lora inspect``'s report.

    report = inspect_adapter("ckpt/step_0002000")                 # rank, targets, sizes, problems
    report = inspect_adapter("ckpt/step_0002000", base="VoxCPM1.5") # + compatibility and update sizes

Sizes are per layer and per part of the model (``models.lora.LORA_PARTS``), measured against the base
weights when a base is known; every check comes from ``adapters``, so inspecting and loading agree.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voxcpm_core.adapters import Adapter, adapter_problems, base_problems, declared_base, read_adapter
from voxcpm_core.io.checkpoint import LORA_CONFIG_FILE, read_model_config, read_model_weights
from voxcpm_core.io.hub import resolve_model_dir
from voxcpm_core.models.lora import (
    LORA_PARTS,
    LoRAConfig,
    is_lora_pair,
    lora_place,
    split_adapter,
    update_norm,
)


@dataclass
class LayerReport:
    name: str
    component: str | None
    in_features: int
    out_features: int
    update_norm: float  # ||scaling * B A||_F
    weight_norm: float | None  # ||W||_F of the base weight (None without the base)

    @property
    def relative_update(self) -> float | None:
        return None if self.weight_norm is None else self.update_norm / max(self.weight_norm, 1e-30)


@dataclass
class ComponentReport:
    name: str  # base_lm, residual_lm, dit, proj
    modules: list[str]  # leaf names, e.g. ["k_proj", "o_proj", "q_proj", "v_proj"]
    layers: int
    tensors: int
    parameters: int
    update_norm: float  # sqrt of the sum over its layers of ||scaling * B A||_F^2
    relative_update: float | None  # update_norm / sqrt(sum of ||W||_F^2)
    max_relative_update: float | None
    max_layer: str | None  # the layer with the largest relative update


@dataclass
class AdapterReport:
    """What ``voxcpm lora inspect`` shows; ``problems`` empty means the adapter is usable (on ``base_dir``)."""

    path: str
    weights_file: str
    file_size: int  # bytes of the weights file
    dtype: str | None
    config_source: str | None  # None: structure inferred from the tensors
    rank: int | None
    alpha: float | None
    scaling: float | None
    dropout: float | None
    targets: dict[str, list[str]]  # enabled option group -> leaf names (lm, dit, proj)
    base_model: str | None  # as declared in lora_config.json
    base_dir: str | None  # the base the checks and sizes used
    tensors: int
    parameters: int
    layers: list[LayerReport]
    components: list[ComponentReport]
    compatible: bool | None  # None: no base checked
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        data = asdict(self)
        for layer, out in zip(self.layers, data["layers"], strict=True):
            out["relative_update"] = layer.relative_update
        return {**data, "ok": self.ok}


def _inspect_base(adapter: Adapter, base: str | os.PathLike | None, notes: list[str]) -> Path | None:
    """The base to check against: ``base`` if given, else the declared one when it is a local folder."""
    if base is not None:
        return resolve_model_dir(base)
    if not adapter.base_model:
        notes.append("no base_model recorded: give base to check compatibility and update sizes")
        return None
    base_dir = declared_base(adapter, download=False)
    if base_dir is None:
        notes.append(
            f"base_model {adapter.base_model!r} is not a local folder: give base to check compatibility and update sizes"
        )
    return base_dir


def _components(layers: list[LayerReport], pairs: dict) -> list[ComponentReport]:
    reports = []
    for name in LORA_PARTS:
        members = [layer for layer in layers if layer.component == name]
        if not members:
            continue
        norm = math.sqrt(sum(layer.update_norm**2 for layer in members))
        relative = biggest = None
        if all(layer.weight_norm is not None for layer in members):
            relative = norm / max(math.sqrt(sum(layer.weight_norm**2 for layer in members)), 1e-30)
            biggest = max(members, key=lambda layer: layer.relative_update)
        reports.append(
            ComponentReport(
                name=name,
                modules=sorted({layer.name.rpartition(".")[2] for layer in members}),
                layers=len(members),
                tensors=2 * len(members),
                parameters=sum(
                    pairs[layer.name][0].numel() + pairs[layer.name][1].numel() for layer in members
                ),
                update_norm=norm,
                relative_update=relative,
                max_relative_update=biggest.relative_update if biggest else None,
                max_layer=biggest.name if biggest else None,
            )
        )
    return reports


def inspect_adapter(
    lora_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    lora_config: LoRAConfig | None = None,
) -> AdapterReport:
    """Describe a LoRA checkpoint folder; with a base model (given or declared and local) also check that
    every tensor fits a layer of it and measure each update against the base weight."""
    adapter = read_adapter(lora_dir, lora_config)
    notes: list[str] = []
    config = adapter.config
    base_dir = _inspect_base(adapter, base, notes)
    problems = adapter_problems(adapter, check_coverage=base_dir is None)
    if config is None and not problems:
        config = adapter.lora_config()
        notes.append(f"no {LORA_CONFIG_FILE}: structure read from the tensors, alpha assumed {config.alpha}")
    pairs, _, _ = split_adapter(adapter.tensors)
    weights = {}
    if base_dir is not None and config is not None and not problems:
        problems = base_problems(adapter, config, read_model_config(base_dir))
        if not problems:  # update sizes relative to the base only where every shape fits
            weights = read_model_weights(base_dir, [f"{m}.weight" for m in pairs])
    scaling = config.scaling if config else None
    layers = []
    for module, (A, B) in pairs.items():
        norm = update_norm(A, B, scaling) if scaling is not None and is_lora_pair(A, B) else math.nan
        W = weights.get(f"{module}.weight")
        w_norm = float(W.double().norm()) if W is not None else None
        place = lora_place(module)
        part = place[1].name if place else None
        layers.append(LayerReport(module, part, int(A.shape[-1]), int(B.shape[0]), norm, w_norm))
    tensors = list(adapter.tensors.values())
    return AdapterReport(
        path=str(adapter.path),
        weights_file=str(adapter.weights_file),
        file_size=adapter.weights_file.stat().st_size,
        dtype=str(tensors[0].dtype).removeprefix("torch.") if tensors else None,
        config_source=adapter.config_source,
        rank=config.r if config else None,
        alpha=config.alpha if config else None,
        scaling=scaling,
        dropout=config.dropout if config else None,
        targets=config.targets() if config else {},
        base_model=adapter.base_model,
        base_dir=str(base_dir.resolve()) if base_dir else None,
        tensors=len(tensors),
        parameters=sum(t.numel() for t in tensors),
        layers=layers,
        components=_components(layers, pairs) if scaling is not None else [],
        compatible=None if base_dir is None else not problems,
        problems=problems,
        notes=notes,
    )
