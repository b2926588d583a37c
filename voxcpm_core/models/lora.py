"""LoRA adapters, torchtune style: a wrapped linear keeps ``weight``/``bias`` and adds ``lora_A``/``lora_B``.

y = W x + b + dropout(B A x) * alpha / r. The scaling lives in a non-persistent buffer, so enabling or
disabling an adapter changes no state-dict key and no module attribute torch.compile guards on.
LoRA is applied before base weights load; base checkpoints then load with only ``lora_*`` keys missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from voxcpm_core.config import config_error
from voxcpm_core.errors import VoxCPMError

ATTENTION_PROJECTIONS = ["q_proj", "v_proj", "k_proj", "o_proj"]
BRIDGE_PROJECTIONS = ["enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj"]


@dataclass(frozen=True)
class LoRAPart:
    """A part of the model adapters can sit in (one row of an adapter's size report)."""

    name: str  # how reports key it
    prefix: str  # the module path its linears live under; "" for the model's top-level linears
    label: str  # how people know it


@dataclass(frozen=True)
class LoRAGroup:
    """Parts that one pair of ``LoRAConfig`` fields selects: the ``enable`` flag switches them on, the
    ``targets`` list names the leaf linears (``q_proj``) that get an adapter in each of them."""

    name: str  # how lora_config summaries key it
    enable: str
    targets: str
    parts: tuple[LoRAPart, ...]

    def enabled(self, cfg: LoRAConfig) -> bool:
        return getattr(cfg, self.enable)

    def leaves(self, cfg: LoRAConfig) -> list[str]:
        return getattr(cfg, self.targets)


# The one description of where LoRA can go, in report order: applying, inferring, checking, inspecting and
# describing adapters all read it. A model family with other places adds rows or parts here, not branches
# below (VoxCPM2's fusion_concat_proj is one more top-level linear: a "proj" place already, one more name).
LORA_GROUPS = (
    LoRAGroup("lm", "enable_lm", "target_modules_lm", (
        LoRAPart("base_lm", "base_lm", "base_lm (LM)"),
        LoRAPart("residual_lm", "residual_lm", "residual_lm (LM)"),
    )),
    LoRAGroup("dit", "enable_dit", "target_modules_dit", (LoRAPart("dit", "feat_decoder.estimator", "feat_decoder (DiT)"),)),
    LoRAGroup("proj", "enable_proj", "target_proj_modules", (LoRAPart("proj", "", "projections"),)),
)  # fmt: skip
LORA_PARTS = {part.name: part for group in LORA_GROUPS for part in group.parts}
ADAPTABLE = ", ".join(part.label for part in LORA_PARTS.values())  # for messages about other places


class LoRAConfig(BaseModel):
    """Which linears get an adapter and its size (the reference's fields and defaults; ``LORA_GROUPS``
    says which parts of the model each enable flag and target list stands for)."""

    model_config = ConfigDict(extra="forbid")

    enable_lm: bool = False
    enable_dit: bool = False
    enable_proj: bool = False
    r: int = Field(default=8, gt=0)
    alpha: int | float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules_lm: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    target_modules_dit: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    target_proj_modules: list[str] = Field(default_factory=lambda: list(BRIDGE_PROJECTIONS))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self) -> dict[str, list[str]]:
        """Each enabled group's leaf names, e.g. ``{"lm": ["q_proj", ...], "proj": [...]}``."""
        return {group.name: list(group.leaves(self)) for group in LORA_GROUPS if group.enabled(self)}

    def structure(self) -> tuple:
        """What adapters must share to load into the same LoRA layers (dropout only matters in training)."""
        return self.r, self.alpha, {name: sorted(set(leaves)) for name, leaves in self.targets().items()}


def parse_lora_config(data: Mapping, source: str = "lora config") -> LoRAConfig:
    """Validate a LoRA config mapping; any problem is one ``VoxCPMError`` line naming the field."""
    try:
        return LoRAConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(exc, source, LoRAConfig, what="LoRA option") from None


class LoRALinear(nn.Module):
    """A linear layer with a low-rank update; takes over the ``weight``/``bias`` of the linear it wraps."""

    # the product with the frozen weight, (x, weight, bias) -> x W^T + b; cpu.kernels.use_cpu_kernels swaps it
    linear_product = staticmethod(F.linear)

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.weight = base.weight  # [out, in]
        self.bias = base.bias  # [out] or None
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("scaling", torch.tensor(alpha / r, device=base.weight.device), persistent=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt 5), B = 0: the update is zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def set_enabled(self, enabled: bool) -> None:
        self.scaling.fill_(self.alpha / self.r if enabled else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return self.linear_product(x, self.weight, self.bias) + self.lora_dropout(update) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A, computed in float32, in the weight's dtype."""
        return merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}"


def merged_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float | torch.Tensor
) -> torch.Tensor:
    """W [out, in] + scaling * B [out, r] @ A [r, in], computed in float32, returned in W's dtype."""
    delta = torch.as_tensor(scaling).float() * (lora_B.float() @ lora_A.float())
    return (weight.float() + delta).to(weight.dtype)


def update_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> float:
    """||scaling * B A||_F without forming B A: ||B A||_F^2 = sum((B^T B) * (A A^T)), both [r, r]."""
    A, B = lora_A.double(), lora_B.double()
    return abs(scaling) * float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())


def _within(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".") if prefix else "." not in name


def lora_place(module: str) -> tuple[LoRAGroup, LoRAPart] | None:
    """The group and part of ``LORA_GROUPS`` an adapted linear (full module path) is in; None: elsewhere."""
    for group in LORA_GROUPS:
        for part in group.parts:
            if _within(module, part.prefix):
                return group, part
    return None


def split_adapter(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str], list[str]]:
    """(module -> (lora_A, lora_B), keys whose partner is missing, keys that are not LoRA tensors)."""
    pairs, half = {}, []
    for key in state_dict:
        module, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B") or module in pairs:
            continue
        a_key, b_key = f"{module}.lora_A", f"{module}.lora_B"
        if a_key in state_dict and b_key in state_dict:
            pairs[module] = (state_dict[a_key], state_dict[b_key])
        else:
            half.append(key)
    foreign = [k for k in state_dict if not k.endswith((".lora_A", ".lora_B"))]
    return pairs, half, foreign


def is_lora_pair(lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether the tensors are [r, in] and [out, r] with one r."""
    return lora_A.dim() == 2 and lora_B.dim() == 2 and lora_A.shape[0] == lora_B.shape[1]


def infer_lora_config(state_dict: Mapping[str, torch.Tensor], source: str) -> LoRAConfig:
    """The LoRA structure an adapter's tensors imply (rank, components, leaf names); alpha stays the default."""
    pairs, _, _ = split_adapter(state_dict)
    if not pairs:
        raise VoxCPMError(f"{source}: holds no lora_A/lora_B tensor pairs; is it a LoRA checkpoint?")
    ranks = sorted({int(a.shape[0]) for a, _ in pairs.values()})
    if len(ranks) > 1:
        raise VoxCPMError(
            f"{source}: mixes LoRA ranks {ranks}; add a lora_config.json or re-export the adapter"
        )
    leaves: dict[LoRAGroup, set[str]] = {group: set() for group in LORA_GROUPS}
    for module in pairs:
        place = lora_place(module)
        if place is None:
            raise VoxCPMError(f"{source}: {module} is not in a part LoRA can adapt ({ADAPTABLE})")
        leaves[place[0]].add(module.rpartition(".")[2])
    fields = {}
    for group, found in leaves.items():  # a group without tensors keeps its default targets, switched off
        fields[group.enable] = bool(found)
        if found:
            fields[group.targets] = sorted(found)
    return LoRAConfig(r=ranks[0], **fields)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the linears ``cfg`` targets in ``LoRALinear`` (in place); returns the wrapped module names."""
    if any(True for _ in lora_modules(model)):
        raise VoxCPMError("LoRA is already applied to this model; apply it once, before loading weights")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    wrapped: list[str] = []
    for group in LORA_GROUPS:
        if not group.enabled(cfg):
            continue
        for target in group.leaves(cfg):
            names = [
                n for n in linears
                if n.rpartition(".")[2] == target and any(_within(n, part.prefix) for part in group.parts)
            ]  # fmt: skip
            if not names:
                where = "/".join(part.prefix or "the top level" for part in group.parts)
                raise VoxCPMError(
                    f"LoRA {group.targets}: {target!r} matches no linear layer in {where}; check the name"
                )
            wrapped += [n for n in names if n not in wrapped]
    for name in wrapped:
        _set_submodule(model, name, LoRALinear(linears[name], cfg.r, cfg.alpha, cfg.dropout))
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every ``*.lora_A`` / ``*.lora_B`` tensor, keyed by full model path."""
    return {
        f"{name}.{part}": getattr(module, part).detach().clone()
        for name, module in lora_modules(model)
        for part in ("lora_A", "lora_B")
    }


def _shape_error(key: str, got: torch.Size, expected: torch.Size, model_rank: int) -> VoxCPMError:
    adapter_rank = got[0] if key.endswith("lora_A") else got[-1]
    if len(got) == 2 and adapter_rank != model_rank:
        return VoxCPMError(
            f"LoRA tensor {key} has shape {list(got)} but the model expects {list(expected)}: the adapter has "
            f"rank {adapter_rank}, the model's LoRA was built with r={model_rank}; build it with r={adapter_rank}"
        )
    return VoxCPMError(
        f"LoRA tensor {key} has shape {list(got)} but the model expects {list(expected)} (rank {model_rank}); "
        "the adapter was trained on a different base model"
    )


def load_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = False
) -> tuple[list[str], list[str]]:
    """Copy adapter tensors into the model's LoRA layers; returns (loaded keys, skipped keys).

    Nothing is copied unless every matching tensor has the right shape. LoRA layers the adapter does
    not cover are reset (zero update), so loading adapter B after A equals loading B alone. Skipped keys
    (no such LoRA layer) are an error with ``strict``, as are uncovered LoRA layers.
    """
    modules = dict(lora_modules(model))
    params = {
        f"{n}.{part}": (getattr(m, part), m) for n, m in modules.items() for part in ("lora_A", "lora_B")
    }
    skipped = [k for k in state_dict if k not in params]
    loaded = [k for k in state_dict if k in params]
    for key in loaded:
        param, module = params[key]
        if state_dict[key].shape != param.shape:
            raise _shape_error(key, state_dict[key].shape, param.shape, module.r)
    covered = {key.rpartition(".")[0] for key in loaded}
    for name in covered:
        missing = [f"{name}.{part}" for part in ("lora_A", "lora_B") if f"{name}.{part}" not in state_dict]
        if missing:
            raise VoxCPMError(
                f"the adapter has only half of a LoRA pair: {missing[0]} is missing; the file is incomplete"
            )
    uncovered = [name for name in modules if name not in covered]
    if strict and skipped:
        raise VoxCPMError(
            f"{len(skipped)} adapter tensor(s) match no LoRA layer of the model, e.g. {skipped[0]}; "
            "build the model with the adapter's lora_config (enable_lm/enable_dit/enable_proj, target modules)"
        )
    if strict and uncovered:
        raise VoxCPMError(
            f"the adapter has no tensors for {len(uncovered)} LoRA layer(s) of the model, e.g. {uncovered[0]}; "
            "build the model with the adapter's lora_config"
        )
    with torch.no_grad():
        for key in loaded:
            params[key][0].copy_(state_dict[key])
        for name in uncovered:
            modules[name].reset_lora_parameters()
    return loaded, skipped


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on (scaling alpha/r) or off (scaling 0) without touching its weights."""
    for _, module in lora_modules(model):
        module.set_enabled(enabled)


def lora_is_enabled(model: nn.Module) -> bool:
    """Whether the model has adapters and they are switched on (``set_lora_enabled``): a nonzero scaling."""
    return any(bool(module.scaling) for _, module in lora_modules(model))


def reset_lora(model: nn.Module) -> None:
    """Unload: A re-initialised, B = 0, so the output equals the base model's."""
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.reset_lora_parameters()


def merge_lora(model: nn.Module) -> list[str]:
    """Fold each adapter (at its current scaling) into its weight and put a plain ``nn.Linear`` back."""
    merged = []
    for name, module in list(lora_modules(model)):
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        with torch.no_grad():
            linear.weight = nn.Parameter(module.merged_weight(), requires_grad=module.weight.requires_grad)
        linear.bias = module.bias
        _set_submodule(model, name, linear)
        merged.append(name)
    return merged


def trainable_lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze every parameter except ``lora_A``/``lora_B`` and return those by name."""
    trainable = {}
    for name, param in model.named_parameters():
        is_lora = name.endswith((".lora_A", ".lora_B"))
        param.requires_grad_(is_lora)
        if is_lora:
            trainable[name] = param
    return trainable
