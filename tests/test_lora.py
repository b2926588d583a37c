"""LoRA: the official adapter loads into a model built from its lora_config.json, and reproduces the
reference's LoRA training step; enable/disable/reset/merge/hot-swap behave as the guide promises."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from reference_data import assert_close, reference_batch, reference_draws, reference_tensors
from torch import nn

from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.checkpoint import load_lora_dir, load_model_dir
from voxcpm_core.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    parse_lora_config,
    reset_lora,
    set_lora_enabled,
    trainable_lora_parameters,
)


def _adapter(preset_dir):
    state_dict, meta = load_lora_dir(preset_dir / "lora")
    return state_dict, parse_lora_config(meta["lora_config"])


@functools.cache
def _cached_base(preset_dir):
    return load_model_dir(preset_dir / "base").model


def _base(preset_dir):
    return copy.deepcopy(_cached_base(preset_dir))


def _lora_model(preset_dir, **overrides):
    """The base model with the adapter's LoRA structure (``overrides`` change it), adapters still empty."""
    state_dict, cfg = _adapter(preset_dir)
    model = _base(preset_dir)
    apply_lora(model, cfg.model_copy(update=overrides))
    return model, state_dict


def _losses(model, ref) -> torch.Tensor:
    with torch.no_grad():
        out = model(reference_batch(ref), reference_draws(ref))
    return torch.stack([out["loss/diff"], out["loss/stop"]])


# ---- config -----------------------------------------------------------------------------------


def test_config_defaults_are_the_reference_ones():
    cfg = LoRAConfig()
    assert (cfg.enable_lm, cfg.enable_dit, cfg.enable_proj) == (False, False, False)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.scaling) == (8, 16, 0.0, 2.0)
    assert (
        sorted(cfg.target_modules_lm)
        == sorted(cfg.target_modules_dit)
        == ["k_proj", "o_proj", "q_proj", "v_proj"]
    )
    assert cfg.target_proj_modules == ["enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj"]


def test_config_rejects_unknown_and_invalid_options():
    with pytest.raises(VoxCPMError, match=r"unknown LoRA option 'rank'.*known options: enable_lm"):
        parse_lora_config({"rank": 8}, source="lora.yaml")
    with pytest.raises(VoxCPMError, match=r"lora.yaml: invalid LoRA option 'r'"):
        parse_lora_config({"r": 0}, source="lora.yaml")
    with pytest.raises(VoxCPMError, match=r"unknown LoRA option 'alpah'; did you mean 'alpha'\?"):
        parse_lora_config({"alpah": 8}, source="lora.yaml")


# ---- the official adapter ---------------------------------------------------------------------


def test_official_adapter_loads_with_no_skipped_keys(preset_dir):
    state_dict, cfg = _adapter(preset_dir)
    model = load_model_dir(preset_dir / "base", lora=cfg).model  # only lora_* keys may be missing
    assert set(lora_state_dict(model)) == set(state_dict)
    loaded, skipped = load_lora_state_dict(model, state_dict, strict=True)
    assert sorted(loaded) == sorted(state_dict) and skipped == []
    for key, value in lora_state_dict(model).items():
        assert torch.equal(value, state_dict[key])


def test_rank_mismatch_is_a_clear_error(preset_dir):
    model, state_dict = _lora_model(preset_dir, r=8)
    before = lora_state_dict(model)
    with pytest.raises(VoxCPMError, match=r"adapter has rank 4, the model's LoRA was built with r=8"):
        load_lora_state_dict(model, state_dict)
    after = lora_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_adapter_for_more_modules_than_the_model_has(preset_dir):
    model, state_dict = _lora_model(preset_dir, enable_dit=False, enable_proj=False)
    loaded, skipped = load_lora_state_dict(model, state_dict)
    assert skipped and all(k.startswith(("feat_decoder.", "enc_to_", "lm_to_", "res_to_")) for k in skipped)
    assert all(k.startswith(("base_lm.", "residual_lm.")) for k in loaded)
    with pytest.raises(VoxCPMError, match=r"match no LoRA layer of the model"):
        load_lora_state_dict(model, state_dict, strict=True)


def test_lora_training_step_matches_reference(preset_dir):
    ref = reference_tensors(preset_dir)
    model, state_dict = _lora_model(preset_dir)
    load_lora_state_dict(model, state_dict, strict=True)
    params = trainable_lora_parameters(model)
    assert all(p.requires_grad == (n in params) for n, p in model.named_parameters())
    model.train()
    out = model(reference_batch(ref), reference_draws(ref))
    assert_close(out["loss/diff"], ref["train.lora.loss_diff"])
    assert_close(out["loss/stop"], ref["train.lora.loss_stop"])
    (out["loss/diff"] + out["loss/stop"]).backward()
    grads = {
        k.removeprefix("train.lora.grad."): v for k, v in ref.items() if k.startswith("train.lora.grad.")
    }
    assert set(grads) == set(params)
    for name, expected in grads.items():
        assert_close(params[name].grad, expected)


# ---- enable / disable / reset / merge / swap --------------------------------------------------


@pytest.fixture
def base_and_adapted(preset_dir):
    ref = reference_tensors(preset_dir)
    base = _base(preset_dir)
    model, state_dict = _lora_model(preset_dir)
    load_lora_state_dict(model, state_dict, strict=True)
    return ref, _losses(base, ref), model, state_dict


def test_disable_gives_base_output_and_enable_restores(base_and_adapted):
    ref, base_out, model, _ = base_and_adapted
    adapted_out = _losses(model, ref)
    assert not torch.allclose(adapted_out, base_out)
    keys = set(model.state_dict())
    set_lora_enabled(model, False)
    assert torch.equal(_losses(model, ref), base_out)
    set_lora_enabled(model, True)
    assert torch.equal(_losses(model, ref), adapted_out)
    assert set(model.state_dict()) == keys  # scaling is not a state-dict entry


def test_reset_gives_base_output(base_and_adapted):
    ref, base_out, model, _ = base_and_adapted
    reset_lora(model)
    assert torch.equal(_losses(model, ref), base_out)
    assert all(
        torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
        for _, m in lora_modules(model)
    )


def test_merge_equals_unmerged(base_and_adapted, preset_dir):
    ref, _, model, _ = base_and_adapted
    adapted_out = _losses(model, ref)
    merged = merge_lora(model)
    assert len(merged) == len(_adapter(preset_dir)[0]) // 2
    assert not any(True for _ in lora_modules(model))
    assert set(model.state_dict()) == set(_base(preset_dir).state_dict())
    assert_close(_losses(model, ref), adapted_out)


def test_swapping_adapters_equals_a_fresh_load(base_and_adapted, preset_dir):
    ref, _, model, adapter_a = base_and_adapted
    # adapter B: other values and no tensors for the projections (those must fall back to zero updates)
    adapter_b = {
        k: v * 0.5 for k, v in adapter_a.items() if not k.startswith(("enc_to_", "lm_to_", "res_to_"))
    }
    load_lora_state_dict(model, adapter_b)
    fresh, _ = _lora_model(preset_dir)
    load_lora_state_dict(fresh, adapter_b)
    assert torch.equal(_losses(model, ref), _losses(fresh, ref))


# ---- the building blocks on their own ---------------------------------------------------------


def test_apply_lora_targets_and_initial_state():
    torch.manual_seed(0)
    toy = nn.ModuleDict(
        {
            "base_lm": nn.ModuleDict({"q_proj": nn.Linear(6, 5), "up_proj": nn.Linear(6, 5)}),
            "enc_to_lm_proj": nn.Linear(5, 4, bias=False),
        }
    )
    weight = toy["base_lm"]["q_proj"].weight
    cfg = LoRAConfig(
        enable_lm=True,
        enable_proj=True,
        r=2,
        alpha=3,
        target_modules_lm=["q_proj"],
        target_proj_modules=["enc_to_lm_proj"],
    )
    names = apply_lora(toy, cfg)
    assert names == ["base_lm.q_proj", "enc_to_lm_proj"]
    wrapped = toy["base_lm"]["q_proj"]
    assert isinstance(wrapped, LoRALinear) and wrapped.weight is weight  # base parameter reused, not copied
    assert set(wrapped.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert wrapped.lora_A.shape == (2, 6) and wrapped.lora_B.shape == (5, 2)
    assert wrapped.scaling.item() == 1.5 and torch.count_nonzero(wrapped.lora_B) == 0
    x = torch.randn(3, 6)
    assert torch.equal(wrapped(x), nn.functional.linear(x, weight, wrapped.bias))  # the base path, plus B A x = 0
    with pytest.raises(VoxCPMError, match="already applied"):
        apply_lora(toy, LoRAConfig(enable_lm=True))


def test_apply_lora_unknown_target_is_an_error():
    toy = nn.ModuleDict({"base_lm": nn.ModuleDict({"q_proj": nn.Linear(6, 5)})})
    with pytest.raises(
        VoxCPMError, match=r"target_modules_lm: 'qproj' matches no linear layer in base_lm/residual_lm"
    ):
        apply_lora(toy, LoRAConfig(enable_lm=True, target_modules_lm=["qproj"]))


def test_merge_folds_in_float32_and_keeps_the_weight_dtype():
    torch.manual_seed(0)
    toy = nn.ModuleDict({"lm_to_dit_proj": nn.Linear(8, 8).to(torch.bfloat16)})
    apply_lora(toy, LoRAConfig(enable_proj=True, target_proj_modules=["lm_to_dit_proj"], r=4, alpha=4))
    layer = toy["lm_to_dit_proj"]
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = (layer.weight.float() + layer.lora_B.float() @ layer.lora_A.float()).to(torch.bfloat16)
    merge_lora(toy)
    assert type(toy["lm_to_dit_proj"]) is nn.Linear
    assert toy["lm_to_dit_proj"].weight.dtype == torch.bfloat16
    assert torch.equal(toy["lm_to_dit_proj"].weight, expected)


def test_enable_toggle_needs_no_recompile_under_torch_compile():
    torch.manual_seed(0)
    toy = nn.ModuleDict({"enc_to_lm_proj": nn.Linear(4, 4)})
    apply_lora(toy, LoRAConfig(enable_proj=True, target_proj_modules=["enc_to_lm_proj"], r=2))
    layer = toy["enc_to_lm_proj"]
    with torch.no_grad():
        layer.lora_B.normal_()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 4)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        on = compiled(x)
        set_lora_enabled(toy, False)
        off = compiled(x)
    torch._dynamo.reset()
    assert torch.allclose(off, nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(on, off)
