"""LoRA checkpoint folders as a whole: reading and checking them, their base model, merging them into it.

    adapter = load_adapter("ckpt/step_0002000")                # read and checked once, then passed on
    base = resolve_base_model(adapter)                         # the folder its lora_config.json names
    merge_adapter("ckpt/step_0002000", "VoxCPM1.5", "merged/") # a standalone model directory

``adapter_report.inspect_adapter`` reports on a folder with these same checks.

An adapter's base model is ``base`` when given, else the ``base_model`` of its ``lora_config.json``:
an absolute path, a path relative to the adapter folder, or a Hub id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from voxcpm_core.config import VoxCPMConfig
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.families import family_of
from voxcpm_core.io.atomic import check_output_dir
from voxcpm_core.io.checkpoint import (
    LORA_CONFIG_FILE,
    load_lora_dir,
    lora_weights_file,
    read_model_config,
    read_model_weights,
    save_model_dir_like,
)
from voxcpm_core.io.hub import is_hub_id, resolve_model_dir
from voxcpm_core.io.run_dir import LATEST_FILE, find_latest
from voxcpm_core.models.lora import (
    ADAPTABLE,
    LORA_GROUPS,
    LoRAConfig,
    apply_lora,
    infer_lora_config,
    is_lora_pair,
    lora_modules,
    lora_place,
    merged_weight,
    parse_lora_config,
    split_adapter,
)

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

    run = path.parent if path.name == LATEST_FILE and path.is_file() else path
    newest = find_latest(run) if run.is_dir() else None
    if newest is not None:
        raise VoxCPMError(
            f"{path}: is a training run, not a LoRA checkpoint; pass one of its step folders, e.g. the newest: {newest}"
        )


def declared_base(adapter: Adapter, download: bool) -> Path | None:
    """The adapter's ``base_model`` as a local folder (None if it is not one and ``download`` is off)."""
    config_path = adapter.path / LORA_CONFIG_FILE
    declared = adapter.base_model
    if not declared:
        what = "names no base_model" if config_path.is_file() else "is missing"
        raise VoxCPMError(f"{config_path} {what}: give the base model directory as base", param="base")
    path = Path(declared).expanduser()
    local = path if path.is_absolute() else adapter.path / path
    if local.is_dir():
        return local.resolve()
    if download and is_hub_id(declared):
        return resolve_model_dir(declared)
    if not download:
        return None
    raise VoxCPMError(
        f"{config_path}: base_model {declared!r} not found (looked for {local}); give the base model directory as base",
        param="base",
    )


def resolve_base_model(adapter: Adapter | str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base model folder of an adapter (a folder, or one already read): ``base`` (a folder or Hub id)
    if given, else its ``base_model``."""
    if base is not None:
        return resolve_model_dir(base)
    return declared_base(adapter if isinstance(adapter, Adapter) else read_adapter(adapter), download=True)


# ---------------------------------------------------------------------------------------------- checks


def adapter_problems(adapter: Adapter, check_coverage: bool = False) -> list[str]:
    """Why the adapter cannot load into any model built with its LoRA config (empty: it can): stray keys,
    broken pairs, rank or target disagreements. ``check_coverage`` (when no base is at hand to check it
    layer by layer) adds enabled groups the adapter has no tensors for."""
    config = adapter.config
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
    broken = [m for m, (A, B) in pairs.items() if not is_lora_pair(A, B)]
    if broken:
        A, B = pairs[broken[0]]
        return problems + [
            f"{broken[0]}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not a rank-r pair ([r, in] and [out, r])"
        ]
    places = {m: lora_place(m) for m in pairs}
    elsewhere = [m for m, place in places.items() if place is None]
    if elsewhere:
        problems.append(f"{elsewhere[0]} is not in a part LoRA can adapt ({ADAPTABLE})")
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
    outside = [
        (module, place[0])
        for module, place in places.items()
        if place is not None
        and not (place[0].enabled(config) and module.rpartition(".")[2] in place[0].leaves(config))
    ]
    if outside:
        module, group = outside[0]
        why = (
            f"{module.rpartition('.')[2]!r} is not in {group.targets}"
            if group.enabled(config)
            else f"{group.enable} is false"
        )
        problems.append(
            f"{len(outside)} adapted layer(s) are outside the targets of {adapter.config_source}, e.g. {module} "
            f"({why}): loading would skip them; fix the LoRA config"
        )
    if check_coverage:  # without a base we can only see whole groups that are enabled but empty
        present = {place[0] for place in places.values() if place is not None}
        for group in LORA_GROUPS:
            if group.enabled(config) and group not in present:
                problems.append(
                    f"{adapter.config_source} sets {group.enable} but the adapter has no tensors there; loading would fail"
                )
    return problems


def load_adapter(lora_dir: str | os.PathLike, lora_config: LoRAConfig | None = None) -> Adapter:
    """``read_adapter`` plus ``adapter_problems``: the adapter, or a VoxCPMError naming its first problem.

    Read each adapter once per call this way and pass the ``Adapter`` on (``VoxCPM.load_lora`` and
    ``resolve_base_model`` take it as it is): nothing reads or checks the folder again.
    """
    adapter = read_adapter(lora_dir, lora_config)
    problems = adapter_problems(adapter)
    if problems:
        raise VoxCPMError(f"{adapter.path}: {problems[0]}")
    return adapter


def base_problems(adapter: Adapter, config: LoRAConfig, base_config: VoxCPMConfig) -> list[str]:
    """What keeps the adapter from loading onto this base: missing layers, uncovered targets, shapes."""
    pairs, _, _ = split_adapter(adapter.tensors)
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = family_of(base_config).network(base_config)
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


# ---------------------------------------------------------------------------------------------- merge


class AdapterMismatchError(VoxCPMError):
    """The adapter does not fit the base model it is merged into: the message gives the first reason,
    ``adapter_report.inspect_adapter(lora_dir, base)`` all of them."""

    def __init__(self, message: str, lora_dir: Path, base: Path):
        super().__init__(message)
        self.lora_dir, self.base = lora_dir, base


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
            "give the LoRA config it was trained with as lora_config",
            param="lora_config",
        )
    base = resolve_base_model(adapter, base_dir)
    out = Path(out_dir)
    for other, what in ((base, "the base model"), (adapter.path, "the adapter")):
        if out.resolve() == Path(other).resolve():
            raise VoxCPMError(f"{out}: the output would replace {what}; choose a new output directory")
    check_output_dir(out, overwrite)  # before the (large) base weights are read
    problems = adapter_problems(adapter) or base_problems(adapter, adapter.config, read_model_config(base))
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterMismatchError(
            f"{adapter.path} cannot be merged into {base}: {problems[0]}{more}",
            adapter.path,
            base,
        )
    weights = read_model_weights(base)
    pairs, _, _ = split_adapter(adapter.tensors)
    for module, (A, B) in pairs.items():
        key = f"{module}.weight"
        weights[key] = merged_weight(weights[key], A, B, adapter.config.scaling)
    save_model_dir_like(out, base, weights, overwrite=overwrite)
    return MergeResult(out, base, len(pairs), adapter.config)

