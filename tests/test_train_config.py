"""The training YAML: the guide's configs, unknown keys, --set overrides, paths, sample_rate."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, official_dir

from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.checkpoint import read_model_config
from voxcpm_core.training.config import check_sample_rate, load_train_config

GUIDE_CONFIGS = sorted((REPO / "conf").glob("voxcpm_v1*/voxcpm_finetune_*.yaml"))

MINIMAL = """\
pretrained_path: model
train_manifest: data/train.jsonl
save_path: ckpt
lora:
  enable_lm: true
  r: 32
"""


def write(tmp_path: Path, text: str = MINIMAL, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_guide_configs_parse():
    assert len(GUIDE_CONFIGS) == 4
    rates = {}
    for path in GUIDE_CONFIGS:
        cfg = load_train_config(path)
        rates[path.parent.name] = cfg.sample_rate
        assert (cfg.lora is not None) == path.name.endswith("_lora.yaml")
        assert cfg.lambdas.as_dict() == {"loss/diff": 1.0, "loss/stop": 1.0}
        assert cfg.val_manifest is None  # "" = no validation
        assert cfg.max_steps == 2000 and cfg.max_batch_tokens == 8192
    assert rates == {"voxcpm_v1": 16000, "voxcpm_v1.5": 44100}
    lora = load_train_config(REPO / "conf/voxcpm_v1.5/voxcpm_finetune_lora.yaml").lora
    assert (lora.r, lora.alpha, lora.enable_lm, lora.enable_dit, lora.enable_proj) == (
        32,
        16,
        True,
        True,
        False,
    )
    assert lora.target_modules_dit == ["q_proj", "v_proj", "k_proj", "o_proj"]


def test_demo_configs_parse_without_building(tmp_path):
    # `demo:` builds on load; here we only check the keys by pointing demo at nothing.
    for name in ("lora.yaml", "full.yaml"):
        text = (REPO / "conf/demo" / name).read_text()
        cfg = load_train_config(write(tmp_path, text.replace("demo: ../../.cache/demo", "demo: ''")))
        assert cfg.demo is None and cfg.val_manifest is not None
        assert (cfg.lora is not None) == (name == "lora.yaml")


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(write(tmp_path / "conf", MINIMAL + "val_manifest: ''\ntensorboard: ''\n"))
    assert cfg.pretrained_path == tmp_path / "conf" / "model"
    assert cfg.train_manifest == tmp_path / "conf" / "data" / "train.jsonl"
    assert cfg.val_manifest is None and cfg.tensorboard is None
    saved = write(tmp_path, cfg.to_yaml(), "saved.yaml")  # what a run writes beside its checkpoints
    assert load_train_config(saved).model_dump() == cfg.model_dump()
    assert cfg.max_steps == cfg.num_iters
    # --set paths are relative to the current folder, as on any command line.
    cfg = load_train_config(write(tmp_path / "conf", MINIMAL), ["save_path=runs/x"])
    assert cfg.save_path == tmp_path / "runs" / "x"
    assert cfg.tensorboard == tmp_path / "runs" / "x" / "tensorboard"  # omitted: beside the checkpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "batch_sise: 4\n", "unknown key 'batch_sise'; did you mean 'batch_size'?"),
        (MINIMAL.replace("r: 32", "rr: 32"), "unknown key 'lora.rr'; did you mean 'lora.r'?"),
        (
            MINIMAL + "lambdas:\n  loss/dif: 1.0\n",
            "unknown key 'lambdas.loss/dif'; did you mean 'lambdas.loss/diff'?",
        ),
    ],
)
def test_unknown_keys_are_errors_with_a_suggestion(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(VoxCPMError) as exc:
        load_train_config(path)
    message = str(exc.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_set_overrides(tmp_path):
    path = write(tmp_path)
    cfg = load_train_config(
        path,
        [
            "lora.r=16",
            "batch_size=4",
            "learning_rate=3e-5",
            "lambdas.loss/stop=0.5",
            "lora.target_modules_lm=[q_proj]",
        ],
    )
    assert cfg.lora.r == 16 and cfg.lora.enable_lm is True  # other lora keys kept
    assert cfg.batch_size == 4 and cfg.learning_rate == pytest.approx(3e-5)
    assert cfg.lambdas.as_dict() == {"loss/diff": 1.0, "loss/stop": 0.5}
    assert cfg.lora.target_modules_lm == ["q_proj"]
    full = load_train_config(write(tmp_path, MINIMAL.split("lora:")[0], "full.yaml"), ["lora.r=4"])
    assert full.lora is not None and full.lora.r == 4  # a section can be created from --set


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.rank=16", "override lora.rank=16: unknown key 'lora.rank'"),
        ("batchsize=4", "did you mean 'batch_size'?"),
        ("batch_size", "expected KEY=VALUE"),
        ("batch_size=-1", "batch_size: Input should be greater than 0 (got -1)"),
        ("batch_size=lots", "batch_size: Input should be a valid integer"),
        ("lora=3", "'lora' is a section"),
        ("precision=fp64", "precision: Input should be 'fp32', 'bf16' or 'auto'"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(VoxCPMError) as exc:
        load_train_config(write(tmp_path), [override])
    assert expected in str(exc.value)


def test_missing_key_and_bad_yaml(tmp_path):
    with pytest.raises(VoxCPMError, match="train_manifest: missing"):
        load_train_config(write(tmp_path, "pretrained_path: m\nsave_path: s\n"))
    with pytest.raises(VoxCPMError, match=r"train\.yaml:2: invalid YAML"):
        load_train_config(write(tmp_path, "pretrained_path: m\n  bad: [\n"))
    with pytest.raises(VoxCPMError, match="pretrained_path: missing"):
        load_train_config(write(tmp_path, "train_manifest: t\nsave_path: s\n"))
    with pytest.raises(VoxCPMError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_sample_rate_must_match_the_model(tmp_path):
    model_config = read_model_config(official_dir("v15-tiny") / "base")  # 44.1 kHz VAE
    assert (
        check_sample_rate(load_train_config(write(tmp_path)), model_config) == 44100
    )  # omitted: the model's
    assert check_sample_rate(load_train_config(write(tmp_path), ["sample_rate=44100"]), model_config) == 44100
    path = write(tmp_path, MINIMAL + "sample_rate: 16000\n")
    with pytest.raises(VoxCPMError) as exc:
        check_sample_rate(load_train_config(path), model_config)
    message = str(exc.value)
    assert (
        message.startswith(str(path))
        and "sample_rate: 16000" in message
        and "set sample_rate: 44100" in message
    )


def test_voxcpm2_sample_rate_is_the_encoder_rate_and_the_error_names_both(tmp_path):
    model_config = read_model_config(official_dir("v2-tiny") / "base")  # encodes 16 kHz, speaks 48 kHz
    assert check_sample_rate(load_train_config(write(tmp_path, MINIMAL + "sample_rate: 16000\n")), model_config) == 16000
    with pytest.raises(VoxCPMError) as exc:
        check_sample_rate(load_train_config(write(tmp_path, MINIMAL + "sample_rate: 48000\n")), model_config)
    message = str(exc.value)
    assert "encoder rate is 16000" in message and "48000 is its output rate" in message
    assert "set sample_rate: 16000" in message and len(message.splitlines()) == 1


def test_v2_reference_keys_and_distribute_needs_hf_model_id(tmp_path):
    cfg = load_train_config(write(tmp_path, MINIMAL + "out_sample_rate: 48000\nmax_grad_norm: 0\n"))
    assert cfg.out_sample_rate == 48000 and cfg.max_grad_norm == 0
    with pytest.raises(VoxCPMError, match="distribute: true names hf_model_id as the adapter's base_model"):
        load_train_config(write(tmp_path, MINIMAL + "distribute: true\n"))
    cfg = load_train_config(write(tmp_path, MINIMAL + "distribute: true\nhf_model_id: openbmb/VoxCPM2\n"))
    assert cfg.distribute and cfg.pretrained_path is not None
