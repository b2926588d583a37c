"""`voxcpm lora inspect|merge` and base-model resolution, run as a user would (exit codes, JSON, files)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from reference_data import reference_tensors
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from voxcpm_cli.main import app
from voxcpm_core.adapters import merge_adapter, resolve_base_model
from voxcpm_core.api import VoxCPM
from voxcpm_core.dev.builder import build_model_dir, tiny_config
from voxcpm_core.errors import VoxCPMError

runner = CliRunner()
GEN = dict(min_len=2, max_len=8, inference_timesteps=4, cfg_value=2.0, retry_badcase=False)


def _voxcpm(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, (SystemExit, VoxCPMError)):
        raise result.exception
    message = str(result.exception) if isinstance(result.exception, VoxCPMError) else ""
    return result.exit_code, result.output + message


def _inspect_json(*args) -> tuple[int, dict]:
    code, out = _voxcpm("lora", "inspect", *args, "--json")
    return code, json.loads(out)


def _copy_adapter(preset_dir: Path, dest: Path, base_model: str | None = "keep", config: bool = True) -> Path:
    """The fixture adapter in a new folder; ``base_model`` rewritten unless "keep", no json with ``config=False``."""
    dest.mkdir(parents=True)
    shutil.copy(preset_dir / "lora" / "lora_weights.safetensors", dest)
    if config:
        meta = json.loads((preset_dir / "lora" / "lora_config.json").read_text())
        if base_model != "keep":
            meta["base_model"] = base_model
        (dest / "lora_config.json").write_text(json.dumps(meta))
    return dest


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A builder model whose sizes differ from the fixtures' (DiT 32 wide, 1 residual layer)."""
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "base", tiny_config(44100))


# ---- inspect ------------------------------------------------------------------------------------


def test_inspect_official_adapter(preset_dir):
    code, report = _inspect_json(preset_dir / "lora")
    assert code == 0 and report["ok"] and report["compatible"] is True and report["problems"] == []
    meta = json.loads((preset_dir / "lora" / "lora_config.json").read_text())
    cfg = meta["lora_config"]
    assert (report["rank"], report["alpha"], report["dropout"]) == (cfg["r"], cfg["alpha"], cfg["dropout"])
    assert report["scaling"] == cfg["alpha"] / cfg["r"]
    assert report["targets"] == {
        "lm": cfg["target_modules_lm"], "dit": cfg["target_modules_dit"], "proj": cfg["target_proj_modules"]
    }  # fmt: skip
    assert report["base_model"] == meta["base_model"]
    assert Path(report["base_dir"]) == (preset_dir / "base").resolve()  # "../base", relative to the adapter
    weights_file = preset_dir / "lora" / "lora_weights.safetensors"
    tensors = load_file(weights_file)
    assert report["file_size"] == weights_file.stat().st_size
    assert report["tensors"] == len(tensors) and report["parameters"] == sum(
        t.numel() for t in tensors.values()
    )
    assert {layer["name"] for layer in report["layers"]} == {k.rpartition(".")[0] for k in tensors}
    components = {c["name"]: c for c in report["components"]}
    assert set(components) == {"base_lm", "residual_lm", "dit", "proj"}
    assert sum(c["layers"] for c in components.values()) == len(report["layers"])
    assert components["proj"]["modules"] == sorted(cfg["target_proj_modules"])

    # the relative update size of one layer, computed the plain way
    base = load_file(preset_dir / "base" / "model.safetensors")
    layer = next(x for x in report["layers"] if x["name"] == "lm_to_dit_proj")
    A, B = tensors["lm_to_dit_proj.lora_A"].double(), tensors["lm_to_dit_proj.lora_B"].double()
    delta = report["scaling"] * B @ A
    assert layer["update_norm"] == pytest.approx(delta.norm().item(), rel=1e-9)
    assert layer["relative_update"] == pytest.approx(
        (delta.norm() / base["lm_to_dit_proj.weight"].double().norm()).item(), rel=1e-9
    )
    # a component's size pools its layers: sqrt(sum |dW|^2) / sqrt(sum |W|^2)
    proj = [x for x in report["layers"] if x["component"] == "proj"]
    w_norms = [base[f"{x['name']}.weight"].double().norm().item() for x in proj]
    expected = sum(x["update_norm"] ** 2 for x in proj) ** 0.5 / sum(w**2 for w in w_norms) ** 0.5
    assert components["proj"]["relative_update"] == pytest.approx(expected, rel=1e-9)

    code, table = _voxcpm("lora", "inspect", preset_dir / "lora")
    assert code == 0 and "OK: compatible with" in table and "feat_decoder (DiT)" in table


def test_inspect_on_a_mismatched_base_exits_1_with_reasons(preset_dir, tiny_base):
    code, report = _inspect_json(preset_dir / "lora", "--base", tiny_base)
    assert code == 1 and report["compatible"] is False and not report["ok"]
    problems = " | ".join(report["problems"])
    assert "do not exist in the base model" in problems  # e.g. residual_lm.layers.1 (the tiny base has one)
    assert (
        "have other sizes in this base" in problems and "but this base needs [4, 32]" in problems
    )  # width 32
    assert all(layer["relative_update"] is None for layer in report["layers"])
    code, table = _voxcpm("lora", "inspect", preset_dir / "lora", "--base", tiny_base)
    assert code == 1 and "NOT USABLE" in table and "problem:" in table


def test_inspect_without_config_or_base(preset_dir, tmp_path):
    bare = _copy_adapter(preset_dir, tmp_path / "bare", config=False)
    code, report = _inspect_json(bare)
    assert code == 0 and report["compatible"] is None and report["base_dir"] is None
    assert report["config_source"] is None and report["rank"] == 4 and report["alpha"] == 16  # the default
    assert any("alpha assumed 16" in note for note in report["notes"])
    assert all(layer["relative_update"] is None for layer in report["layers"])


def test_inspect_config_that_disagrees_with_the_tensors(preset_dir, tmp_path):
    adapter = _copy_adapter(preset_dir, tmp_path / "a", base_model=None)
    meta = json.loads((adapter / "lora_config.json").read_text())
    meta["lora_config"].update(r=8, enable_proj=False)
    (adapter / "lora_config.json").write_text(json.dumps(meta))
    code, report = _inspect_json(adapter)
    assert code == 1 and report["compatible"] is None  # no base known, still not usable
    problems = " | ".join(report["problems"])
    assert "says r=8 but the tensors have rank 4" in problems
    assert "outside the targets" in problems and "enable_proj is false" in problems
    assert any("no base_model recorded" in note for note in report["notes"])


def test_inspect_bad_folders_are_one_line_errors(preset_dir, tmp_path):
    code, out = _voxcpm("lora", "inspect", tmp_path / "missing")
    assert code == 1 and "LoRA checkpoint directory not found" in out
    code, out = _voxcpm("lora", "inspect", preset_dir / "base")
    assert code == 1 and "no LoRA weights found" in out
    full = tmp_path / "full"
    full.mkdir()
    shutil.copy(preset_dir / "base" / "model.safetensors", full / "lora_weights.safetensors")
    code, report = _inspect_json(full)
    assert code == 1 and "not LoRA tensors" in report["problems"][0]


def test_a_training_run_folder_points_to_its_newest_checkpoint(preset_dir, tmp_path):
    step = _copy_adapter(preset_dir, tmp_path / "run" / "step_0000020")
    (step / "training_state.json").write_text('{"step": 20}')
    (tmp_path / "run" / "latest").write_text("step_0000020\n")
    for given in (tmp_path / "run", tmp_path / "run" / "latest"):
        code, out = _voxcpm("lora", "inspect", given)
        assert code == 1 and "is a training run, not a LoRA checkpoint" in out and str(step) in out


# ---- base resolution ----------------------------------------------------------------------------


def test_base_model_resolution(preset_dir, tmp_path, monkeypatch):
    base = (preset_dir / "base").resolve()
    assert resolve_base_model(_copy_adapter(preset_dir, tmp_path / "abs", str(base))) == base
    (tmp_path / "model").symlink_to(base, target_is_directory=True)
    nested = _copy_adapter(preset_dir, tmp_path / "runs" / "step_1", str(Path("..") / ".." / "model"))
    assert resolve_base_model(nested) == base  # relative to the adapter folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VoxCPMError, match=r"base_model 'model' not found \(looked for .*/elsewhere/model\)"):
        resolve_base_model(_copy_adapter(preset_dir, tmp_path / "elsewhere", "model"))  # not the cwd
    assert resolve_base_model(tmp_path / "abs", base=tmp_path / "model") == tmp_path / "model"  # --base wins

    with pytest.raises(VoxCPMError, match=r"names no base_model.*as base") as info:
        resolve_base_model(_copy_adapter(preset_dir, tmp_path / "none", None))
    assert info.value.param == "base"  # each command says it with its own option:
    code, text = _voxcpm("lora", "merge", tmp_path / "none", "-o", tmp_path / "merged")
    assert code == 1 and "names no base_model" in text and "(--base)" in text
    code, text = _infer("--lora-ckpt", tmp_path / "none", "--text", "Hi.", "-o", tmp_path / "x.wav")
    assert code == 1 and "names no base_model" in text and "(--ckpt-dir)" in text
    with pytest.raises(VoxCPMError, match=r"lora_config.json is missing"):
        resolve_base_model(_copy_adapter(preset_dir, tmp_path / "bare", config=False))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the hub extra were not installed
    with pytest.raises(VoxCPMError, match=r"voxcpm-tune\[hub\]"):
        resolve_base_model(_copy_adapter(preset_dir, tmp_path / "hub", "someone-nonexistent/voxcpm-model"))


# ---- merge --------------------------------------------------------------------------------------


def test_merge_cli_equals_the_unmerged_adapter(preset_dir, tmp_path):
    out = tmp_path / "merged"
    code, text = _voxcpm("lora", "merge", preset_dir / "lora", "--output", out)  # base from lora_config.json
    assert code == 0 and "merged" in text and str(out) in text
    base_files = sorted(p.name for p in (preset_dir / "base").iterdir())
    assert sorted(p.name for p in out.iterdir()) == base_files  # same layout as the base
    for name in ("config.json", "audiovae.pth", "tokenizer.json"):
        assert (out / name).read_bytes() == (preset_dir / "base" / name).read_bytes()
    merged, base = load_file(out / "model.safetensors"), load_file(preset_dir / "base" / "model.safetensors")
    adapter = load_file(preset_dir / "lora" / "lora_weights.safetensors")
    assert set(merged) == set(base) and not any("lora" in k for k in merged)
    assert all(merged[k].dtype == base[k].dtype for k in base)
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {k.replace(".lora_A", ".weight") for k in adapter if k.endswith(".lora_A")}

    seed = json.loads((preset_dir / "reference.json").read_text())["sub_seeds"]["generate"]
    with_adapter = VoxCPM.from_pretrained(
        preset_dir / "base", lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32"
    )
    standalone = VoxCPM.from_pretrained(out, device="cpu", dtype="float32")
    assert not standalone.lora_enabled
    a = with_adapter.generate("Hello world.", seed=seed, **GEN)
    b = standalone.generate("Hello world.", seed=seed, **GEN)
    assert a.shape == b.shape and abs(a - b).max() < 1e-4

    code, text = _voxcpm("lora", "merge", preset_dir / "lora", "--output", out)
    assert code == 1 and "already exists" in text


def test_merge_keeps_a_bfloat16_base_in_bfloat16(preset_dir, tmp_path):
    base = tmp_path / "base16"
    shutil.copytree(preset_dir / "base", base)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()}
    save_file(weights, base / "model.safetensors")
    result = merge_adapter(preset_dir / "lora", base, tmp_path / "out")
    merged = load_file(result.out_dir / "model.safetensors")
    adapter = load_file(preset_dir / "lora" / "lora_weights.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    key = "base_lm.layers.0.self_attn.q_proj"
    delta = result.config.scaling * adapter[f"{key}.lora_B"] @ adapter[f"{key}.lora_A"]  # float32
    assert torch.equal(merged[f"{key}.weight"], (weights[f"{key}.weight"].float() + delta).to(torch.bfloat16))


def test_merge_errors(preset_dir, tmp_path, tiny_base):
    code, text = _voxcpm("lora", "merge", preset_dir / "lora", "--base", tiny_base, "-o", tmp_path / "x")
    assert code == 1 and "cannot be merged into" in text and "voxcpm lora inspect" in text
    assert not (tmp_path / "x").exists()
    code, text = _voxcpm("lora", "merge", preset_dir / "lora", "-o", preset_dir / "base", "--overwrite")
    assert code == 1 and "would replace the base model" in text
    bare = _copy_adapter(preset_dir, tmp_path / "bare", config=False)
    code, text = _voxcpm("lora", "merge", bare, "--base", preset_dir / "base", "-o", tmp_path / "y")
    assert code == 1 and "alpha" in text and "--config" in text and not (tmp_path / "y").exists()
    code, text = _voxcpm("lora", "merge", preset_dir / "lora")
    assert code == 2 and "--output" in text


def test_merge_with_a_training_yaml(preset_dir, tmp_path):
    """An adapter saved without lora_config.json: structure and base come from the training YAML."""
    bare = _copy_adapter(preset_dir, tmp_path / "bare", config=False)
    cfg = json.loads((preset_dir / "lora" / "lora_config.json").read_text())["lora_config"]
    yaml_text = (
        f"pretrained_path: {(preset_dir / 'base').resolve()}\ntrain_manifest: train.jsonl\nsave_path: ckpt\n"
        f"lora: {json.dumps(cfg)}\n"
    )
    (tmp_path / "lora.yaml").write_text(yaml_text)
    code, text = _voxcpm("lora", "merge", bare, "--config", tmp_path / "lora.yaml", "-o", tmp_path / "m1")
    assert code == 0, text
    reference = merge_adapter(preset_dir / "lora", None, tmp_path / "m2").out_dir
    a, b = load_file(tmp_path / "m1" / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---- infer --lora-ckpt ----------------------------------------------------------------------------


def _infer(*args) -> tuple[int, str]:
    return _voxcpm(
        "infer",
        *args,
        "--inference-timesteps",
        "4",
        "--max-len",
        "8",
        "--no-retry-badcase",
        "--device",
        "cpu",
        "--dtype",  # auto would be bfloat16 on CPUs with native bf16
        "float32",
    )


def _wav(path: Path) -> np.ndarray:
    wav, _ = sf.read(path, dtype="float32")
    return wav


def _close(a: np.ndarray, b: np.ndarray, atol: float = 1e-4) -> bool:  # 16-bit WAV files: 3e-5 steps
    return a.shape == b.shape and float(np.abs(a - b).max()) <= atol


def test_infer_lora_ckpt_alone_reproduces_the_reference(preset_dir, tmp_path):
    """No --ckpt-dir: the base is the adapter's base_model ("../base", relative to the adapter folder)."""
    seed = json.loads((preset_dir / "reference.json").read_text())["sub_seeds"]["generate"]
    out = tmp_path / "lora.wav"
    code, text = _infer(
        "--lora-ckpt", preset_dir / "lora", "--text", "Hello world.", "--seed", seed, "-o", out
    )
    assert code == 0, text
    assert f"wrote {out}" in text and f"seed {seed}" in text
    expected = reference_tensors(preset_dir)["gen.lora.noprompt.wav"][0].numpy()
    assert _close(_wav(out), expected)


def test_infer_several_adapters_renders_every_text_under_each(preset_dir, tmp_path):
    other = _copy_adapter(preset_dir, tmp_path / "run_b" / "lora", str((preset_dir / "base").resolve()))
    tensors = load_file(other / "lora_weights.safetensors")
    save_file({k: v * 0.5 for k, v in tensors.items()}, other / "lora_weights.safetensors")
    texts = tmp_path / "texts.txt"
    texts.write_text("Hello world.\n\nSecond line.\n")
    out = tmp_path / "out"
    code, text = _infer(
        "--lora-ckpt",
        preset_dir / "lora",
        "--lora-ckpt",
        other,
        "--text-file",
        texts,
        "--output-dir",
        out,
        "--seed",
        5,
    )
    assert code == 0, text
    official = preset_dir.name + "-lora"  # both folders are named "lora": their parents tell them apart
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.wav")) == sorted(
        [f"{official}/0001.wav", f"{official}/0003.wav", "run_b-lora/0001.wav", "run_b-lora/0003.wav"]
    )
    assert "rendered 4 files (2 texts x 2 adapters)" in text
    for folder, adapter in ((official, preset_dir / "lora"), ("run_b-lora", other)):
        tts = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=adapter, device="cpu", dtype="float32")
        for name, line in (("0001", "Hello world."), ("0003", "Second line.")):
            assert _close(_wav(out / folder / f"{name}.wav"), tts.generate(line, seed=5, **GEN)), (
                folder,
                name,
            )
    assert not _close(_wav(out / official / "0001.wav"), _wav(out / "run_b-lora" / "0001.wav"))


def test_infer_batch_manifest_with_per_line_prompts(preset_dir, tmp_path):
    shutil.copy(preset_dir / "prompt.wav", tmp_path / "voice.wav")
    manifest = tmp_path / "batch.jsonl"
    lines = [
        {"text": "Hi there.", "id": "greeting"},
        {"text": "Cloned.", "prompt_audio": "voice.wav", "prompt_text": "Hello."},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    code, text = _infer(
        "--lora-ckpt", preset_dir / "lora", "--batch", manifest, "--output-dir", out, "--seed", 9
    )
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["0002.wav", "greeting.wav"]
    tts = VoxCPM.from_pretrained(preset_dir / "base", lora_weights_path=preset_dir / "lora", device="cpu", dtype="float32")
    expected = tts.generate(
        "Cloned.", prompt_wav_path=preset_dir / "prompt.wav", prompt_text="Hello.", seed=9, **GEN
    )
    assert _close(_wav(out / "0002.wav"), expected)


def test_infer_adapters_that_cannot_share_a_structure_are_clear_errors(preset_dir, tmp_path):
    tensors = load_file(preset_dir / "lora" / "lora_weights.safetensors")
    rank2 = _copy_adapter(preset_dir, tmp_path / "rank2")
    save_file(
        {k: (v[:2] if k.endswith("lora_A") else v[:, :2]).contiguous() for k, v in tensors.items()},
        rank2 / "lora_weights.safetensors",
    )
    meta = json.loads((rank2 / "lora_config.json").read_text())
    meta["lora_config"]["r"] = 2
    (rank2 / "lora_config.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code, text = _infer(
        "--lora-ckpt", preset_dir / "lora", "--lora-ckpt", rank2, "--text", "Hi.", "--output-dir", out
    )
    assert code == 1 and "(r=2, alpha=8) differs from" in text and "separate runs" in text
    assert not out.exists()  # checked before anything rendered

    yaml = tmp_path / "lora.yaml"
    yaml.write_text(
        f"pretrained_path: {preset_dir / 'base'}\ntrain_manifest: t.jsonl\nsave_path: ckpt\n"
        "lora: {enable_lm: true, enable_dit: true, enable_proj: true, r: 8, alpha: 16}\n"
    )
    code, text = _infer(
        "--config", yaml, "--lora-ckpt", preset_dir / "lora", "--text", "Hi.", "-o", tmp_path / "x.wav"
    )
    assert code == 1 and "says r=8 but the tensors have rank 4" in text and "set r: 4" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "Hi.", "--text-file", "t.txt", "--output-dir", "o"], "give exactly one of them"),
        (["--text-file", "t.txt"], "pass --output-dir"),
        (
            ["--text", "Hi.", "--lora-ckpt", "{lora}", "--lora-ckpt", "{lora}", "-o", "x.wav"],
            "pass --output-dir",
        ),
        (["--text", "Hi.", "-o", "x.wav"], "pass --ckpt-dir (or --lora-ckpt"),
        (
            ["--batch", "b.jsonl", "--output-dir", "o", "--lora-ckpt", "{lora}", "--prompt-text", "x"],
            "prompts per line",
        ),
    ],
)
def test_infer_usage_errors_exit_2(preset_dir, args, message):
    code, text = _voxcpm("infer", *[a.format(lora=preset_dir / "lora") for a in args])
    assert code == 2 and message in text
