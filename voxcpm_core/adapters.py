"""LoRA checkpoint folders as a whole: their base model, what they hold, and merging them into a model.

    report = inspect_adapter("ckpt/step_0002000")                 # rank, targets, sizes, problems
    report = inspect_adapter("ckpt/step_0002000", base="VoxCPM1.5") # + compatibility and update sizes
    merge_adapter("ckpt/step_0002000", "VoxCPM1.5", "merged/")      # a standalone model directory

An adapter's base model is ``--base`` when given, else the ``base_model`` of its ``lora_config.json``:
an absolute path, a path relative to the adapter folder, or a Hub id.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from voxcpm_core.config import VoxCPMConfig
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.checkpoint import (
    LORA_CONFIG_FILE,
    check_output_dir,
    load_lora_dir,
    lora_weights_file,
    read_model_config,
    read_model_weights,
    save_model_dir_like,
)
from voxcpm_core.models.lora import (
    COMPONENTS,
    LM_STACKS,
    LoRAConfig,
    apply_lora,
    component_of,
    infer_lora_config,
    lora_modules,
    merged_weight,
    parse_lora_config,
    split_adapter,
    update_norm,
)
from voxcpm_core.models.voxcpm import VoxCPMModel

OPTION_GROUPS = {  # LoRAConfig's (enable flag, target list) per group of components
    "lm": ("enable_lm", "target_modules_lm"),  # base_lm and residual_lm
    "dit": ("enable_dit", "target_modules_dit"),
    "proj": ("enable_proj", "target_proj_modules"),
}


def _group(component: str) -> str:
    return "lm" if component in LM_STACKS else component


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Adapter:
    """A LoRA checkpoint folder in memory. ``config`` is None when no LoRA config was saved or given."""

    path: Path
    weights_file: Path
    tensors: dict[str, torch.Tensor]
    config: LoRAConfig | None
    config_source: str | None  # where ``config`` came from: lora_config.json or the caller
    base_model: str | None  # as written in lora_config.json

    def lora_config(self) -> LoRAConfig:
        """The saved/given structure, else the one the tensors imply (alpha then the default 16)."""
        return self.config or infer_lora_config(self.tensors, str(self.weights_file))


def read_adapter(lora_dir: str | os.PathLike, lora_config: LoRAConfig | None = None) -> Adapter:
    """Read a LoRA checkpoint folder; ``lora_config`` (e.g. a training YAML's ``lora:``) overrides its json."""
    lora_dir = Path(lora_dir)
    try:
        tensors, meta = load_lora_dir(lora_dir)
    except VoxCPMError:
        _raise_if_training_run(lora_dir)
        raise
    meta = meta or {}
    config, source = lora_config, "the LoRA config given"
    if config is None and "lora_config" in meta:
        config_path = lora_dir / LORA_CONFIG_FILE
        config, source = parse_lora_config(meta["lora_config"], source=str(config_path)), str(config_path)
    return Adapter(
        lora_dir,
        lora_weights_file(lora_dir),
        tensors,
        config,
        source if config else None,
        meta.get("base_model"),
    )


def _raise_if_training_run(path: Path) -> None:
    """A training run folder (or its ``latest`` file) given where a checkpoint belongs: name the checkpoint."""
    from voxcpm_core.training.state import LATEST_FILE, find_latest

    run = path.parent if path.name == LATEST_FILE and path.is_file() else path
    newest = find_latest(run) if run.is_dir() else None
    if newest is not None:
        raise VoxCPMError(
            f"{path}: is a training run, not a LoRA checkpoint; pass one of its step folders, e.g. the newest: {newest}"
        )


def _model_dir(name: str | os.PathLike) -> Path:
    from voxcpm_core.api import resolve_model_dir  # api imports this module: resolved at call time

    return resolve_model_dir(name)


def _is_hub_id(name: str) -> bool:
    from voxcpm_core.api import HUB_ID

    return HUB_ID.fullmatch(name) is not None


def _declared_base(adapter: Adapter, download: bool) -> Path | None:
    """The adapter's ``base_model`` as a local folder (None if it is not one and ``download`` is off)."""
    config_path = adapter.path / LORA_CONFIG_FILE
    declared = adapter.base_model
    if not declared:
        what = "names no base_model" if config_path.is_file() else "is missing"
        raise VoxCPMError(
            f"{config_path} {what}: pass the base model directory (--base, or --ckpt-dir for infer)"
        )
    path = Path(declared).expanduser()
    local = path if path.is_absolute() else adapter.path / path
    if local.is_dir():
        return local.resolve()
    if download and _is_hub_id(declared):
        return _model_dir(declared)
    if not download:
        return None
    raise VoxCPMError(
        f"{config_path}: base_model {declared!r} not found (looked for {local}); pass the base model directory with --base"
    )


def resolve_base_model(lora_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base model folder of an adapter: ``base`` (a folder or Hub id) if given, else its ``base_model``."""
    if base is not None:
        return _model_dir(base)
    return _declared_base(read_adapter(lora_dir), download=True)


# ---------------------------------------------------------------------------------------------- checks


def _is_pair(A: torch.Tensor, B: torch.Tensor) -> bool:
    return A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[1]


def _own_problems(adapter: Adapter, config: LoRAConfig | None, check_coverage: bool) -> list[str]:
    """What is wrong with the adapter on any base: stray keys, broken pairs, rank or target disagreements."""
    pairs, half, foreign = split_adapter(adapter.tensors)
    problems = []
    if foreign:
        problems.append(
            f"{len(foreign)} tensor(s) are not LoRA tensors, e.g. {foreign[0]}: a LoRA weights file holds only "
            "*.lora_A / *.lora_B tensors; is this a full model checkpoint?"
        )
    if half:
        problems.append(
            f"{half[0]}: its lora_A/lora_B partner is missing ({len(half)} such key(s)); the file is incomplete"
        )
    if not pairs:
        return problems + [f"{adapter.weights_file}: holds no lora_A/lora_B tensor pairs"]
    broken = [m for m, (A, B) in pairs.items() if not _is_pair(A, B)]
    if broken:
        A, B = pairs[broken[0]]
        return problems + [
            f"{broken[0]}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not a rank-r pair ([r, in] and [out, r])"
        ]
    elsewhere = [m for m in pairs if component_of(m) is None]
    if elsewhere:
        problems.append(
            f"{elsewhere[0]} is not in a part LoRA can adapt (base_lm, residual_lm, the DiT, projections)"
        )
    ranks = sorted({int(A.shape[0]) for A, _ in pairs.values()})
    if config is None:
        if len(ranks) > 1:
            problems.append(f"the tensors mix LoRA ranks {ranks}; one adapter has one rank")
        return problems
    wrong_rank = [m for m, (A, _) in pairs.items() if A.shape[0] != config.r]
    if wrong_rank:
        rank = int(pairs[wrong_rank[0]][0].shape[0])
        problems.append(
            f"{adapter.config_source} says r={config.r} but the tensors have rank {rank} (e.g. {wrong_rank[0]}.lora_A): "
            f"the adapter would not load; set r: {rank}"
        )
    outside = []
    for module in pairs:
        if module in elsewhere:
            continue
        enable, targets = OPTION_GROUPS[_group(component_of(module))]
        if not getattr(config, enable) or module.rpartition(".")[2] not in getattr(config, targets):
            outside.append((module, enable, targets))
    if outside:
        module, enable, targets = outside[0]
        why = (
            f"{enable} is false"
            if not getattr(config, enable)
            else f"{module.rpartition('.')[2]!r} is not in {targets}"
        )
        problems.append(
            f"{len(outside)} adapted layer(s) are outside the targets of {adapter.config_source}, e.g. {module} "
            f"({why}): loading would skip them; fix the LoRA config"
        )
    if check_coverage:  # without a base we can only see whole components that are enabled but empty
        present = {_group(component_of(module)) for module in pairs}
        for group, (enable, _) in OPTION_GROUPS.items():
            if getattr(config, enable) and group not in present:
                problems.append(
                    f"{adapter.config_source} sets {enable} but the adapter has no tensors there; loading would fail"
                )
    return problems


def adapter_problems(adapter: Adapter) -> list[str]:
    """Why the adapter cannot load into any model built with its LoRA config (empty: it can)."""
    return _own_problems(adapter, adapter.config, check_coverage=False)


def _base_problems(adapter: Adapter, config: LoRAConfig, base_config: VoxCPMConfig) -> list[str]:
    """What keeps the adapter from loading onto this base: missing layers, uncovered targets, shapes."""
    pairs, _, _ = split_adapter(adapter.tensors)
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = VoxCPMModel(base_config)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    try:
        apply_lora(model, config)
    except VoxCPMError as exc:
        return [f"{adapter.config_source} does not fit this base: {exc}"]
    expected = {name: (m.lora_A.shape, m.lora_B.shape) for name, m in lora_modules(model)}
    problems = []
    absent = [m for m in pairs if m not in linears]
    if absent:
        problems.append(
            f"{len(absent)} adapted layer(s) do not exist in the base model, e.g. {absent[0]}: "
            "the adapter was trained on another model"
        )
    uncovered = [m for m in expected if m not in pairs]
    if uncovered:
        problems.append(
            f"the base has {len(uncovered)} targeted layer(s) the adapter has no tensors for, e.g. {uncovered[0]}: "
            "the adapter was trained on another model or with other targets"
        )
    misfits = [m for m, (A, B) in pairs.items() if m in expected and (A.shape, B.shape) != expected[m]]
    if misfits:
        (A, B), (want_A, want_B) = pairs[misfits[0]], expected[misfits[0]]
        problems.append(
            f"{len(misfits)} layer(s) have other sizes in this base, e.g. {misfits[0]}: lora_A {list(A.shape)} / "
            f"lora_B {list(B.shape)} but this base needs {list(want_A)} / {list(want_B)}: the adapter was trained on another model"
        )
    return problems


# ---------------------------------------------------------------------------------------------- inspect


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
        return _model_dir(base)
    if not adapter.base_model:
        notes.append("no base_model recorded: pass --base to check compatibility and update sizes")
        return None
    base_dir = _declared_base(adapter, download=False)
    if base_dir is None:
        notes.append(
            f"base_model {adapter.base_model!r} is not a local folder: pass --base to check compatibility and update sizes"
        )
    return base_dir


def _targets(config: LoRAConfig) -> dict[str, list[str]]:
    return {
        group: list(getattr(config, targets))
        for group, (enable, targets) in OPTION_GROUPS.items()
        if getattr(config, enable)
    }


def _components(layers: list[LayerReport], pairs: dict) -> list[ComponentReport]:
    reports = []
    for name in COMPONENTS:
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
    problems = _own_problems(adapter, config, check_coverage=base_dir is None)
    if config is None and not problems:
        config = adapter.lora_config()
        notes.append(f"no {LORA_CONFIG_FILE}: structure read from the tensors, alpha assumed {config.alpha}")
    pairs, _, _ = split_adapter(adapter.tensors)
    weights = {}
    if base_dir is not None and config is not None and not problems:
        problems = _base_problems(adapter, config, read_model_config(base_dir))
        if not problems:  # update sizes relative to the base only where every shape fits
            weights = read_model_weights(base_dir, [f"{m}.weight" for m in pairs])
    scaling = config.scaling if config else None
    layers = []
    for module, (A, B) in pairs.items():
        norm = update_norm(A, B, scaling) if scaling is not None and _is_pair(A, B) else math.nan
        W = weights.get(f"{module}.weight")
        w_norm = float(W.double().norm()) if W is not None else None
        layers.append(
            LayerReport(module, component_of(module), int(A.shape[-1]), int(B.shape[0]), norm, w_norm)
        )
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
        targets=_targets(config) if config else {},
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


# ---------------------------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    out_dir: Path
    base_dir: Path
    layers: int  # weights changed
    config: LoRAConfig


def merge_adapter(
    lora_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    lora_config: LoRAConfig | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Write ``out_dir``: the base model directory with W + (alpha/r) B A folded into every adapted weight.

    Computed in float32 and stored in each weight's own dtype; no LoRA keys; config, VAE and tokenizer
    files copied unchanged, so any VoxCPM loader (this one, the reference) reads it as a plain model.
    ``base_dir`` None means the adapter's ``base_model``.
    """
    adapter = read_adapter(lora_dir, lora_config)
    if adapter.config is None:
        raise VoxCPMError(
            f"{adapter.path}: no {LORA_CONFIG_FILE}, so alpha (the update's scale) is unknown; "
            "pass the training config with --config lora.yaml"
        )
    base = resolve_base_model(adapter.path, base_dir)
    out = Path(out_dir)
    for other, what in ((base, "the base model"), (adapter.path, "the adapter")):
        if out.resolve() == Path(other).resolve():
            raise VoxCPMError(f"{out}: the output would replace {what}; choose a new output directory")
    check_output_dir(out, overwrite)  # before the (large) base weights are read
    problems = adapter_problems(adapter) or _base_problems(adapter, adapter.config, read_model_config(base))
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VoxCPMError(
            f"{adapter.path} cannot be merged into {base}: {problems[0]}{more}; see voxcpm lora inspect {adapter.path} --base {base}"
        )
    weights = read_model_weights(base)
    pairs, _, _ = split_adapter(adapter.tensors)
    for module, (A, B) in pairs.items():
        key = f"{module}.weight"
        weights[key] = merged_weight(weights[key], A, B, adapter.config.scaling)
    save_model_dir_like(out, base, weights, overwrite=overwrite)
    return MergeResult(out, base, len(pairs), adapter.config)


def training_lora_settings(config_path: str | os.PathLike) -> tuple[LoRAConfig, Path | str]:
    """(the ``lora:`` section, the base model: ``pretrained_path`` or ``hf_model_id``) of a training YAML."""
    from voxcpm_core.training.config import load_train_config  # pulls in the trainer's config schema

    cfg = load_train_config(config_path)
    if cfg.lora is None:
        raise VoxCPMError(f"{config_path}: has no lora: section; pass the YAML the adapter was trained with")
    return cfg.lora, cfg.pretrained_path if cfg.pretrained_path is not None else cfg.hf_model_id
