"""`voxcpm train full|lora` end to end on a tiny model: checkpoints, metrics, resume, pruning, NaN steps, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file
from typer.testing import CliRunner
from wavs import write_clip, write_manifest

from voxcpm_cli.main import app
from voxcpm_core.cpu import memory
from voxcpm_core.dev.builder import build_model_dir, tiny_config
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io import run_dir as train_state
from voxcpm_core.io.checkpoint import load_lora_dir, load_model_dir
from voxcpm_core.models.lora import LoRAConfig, load_lora_state_dict
from voxcpm_core.models.voxcpm import VoxCPMModel
from voxcpm_core.training import trainer
from voxcpm_core.training.config import load_train_config
from voxcpm_core.training.metrics import read_metrics
from voxcpm_core.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups

runner = CliRunner()
LORA = dict(enable_lm=True, enable_dit=True, enable_proj=True, r=4, alpha=8, dropout=0.0)
GUIDE_FULL_FILES = {"model.safetensors", "config.json", "audiovae.pth", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "optimizer.pth", "scheduler.pth", "training_state.json"}
GUIDE_LORA_FILES = {"lora_weights.safetensors", "lora_config.json", "optimizer.pth", "scheduler.pth", "training_state.json"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model, 6 training and 2 validation clips (two datasets), one shared latent cache."""
    root = tmp_path_factory.mktemp("train")
    build_model_dir(root / "model", tiny_config(16000), seed=0)
    train_rows = [
        {"audio": f"wavs/t{i}.wav", "text": f"clip number {i} says hello.", "dataset_id": i % 2} for i in range(6)
    ]
    for i in range(6):
        write_clip(root / f"wavs/t{i}.wav", seconds=0.5 + 0.15 * i, frequency=150 + 40 * i)
    for i in range(2):
        write_clip(root / f"wavs/v{i}.wav", seconds=0.7, frequency=200 + 50 * i)
    write_manifest(root / "train.jsonl", train_rows)
    write_manifest(root / "val.jsonl", [{"audio": f"wavs/v{i}.wav", "text": f"validation {i}."} for i in range(2)])
    return root


def write_config(setup, save_path, lora=LORA, **overrides):
    cfg = dict(
        pretrained_path=str(setup / "model"),
        train_manifest=str(setup / "train.jsonl"),
        val_manifest="",
        cache_dir=str(setup / "latents"),
        batch_size=2,
        grad_accum_steps=1,
        num_workers=0,
        num_iters=4,
        log_interval=1,
        valid_interval=0,
        save_interval=0,
        learning_rate=0.002,
        weight_decay=0.01,
        warmup_steps=1,
        max_batch_tokens=0,
        save_path=str(save_path),
        keep_last_n=0,
        seed=7,
        lambdas={"loss/diff": 1.0, "loss/stop": 1.0},
    )
    if lora is not None:
        cfg["lora"] = lora
    cfg.update(overrides)
    path = save_path.parent / f"{save_path.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _train_cli(mode, config, *args):
    return runner.invoke(app, ["train", mode, "--config", str(config), *args], env={"COLUMNS": "200"})


def _losses(save_path):
    return [(m["step"], m["loss/diff"], m["loss/stop"]) for m in read_metrics(save_path) if "loss/diff" in m]


# ---------------------------------------------------------------------------------------------- end to end


def test_lora_cli_writes_guide_layout_metrics_tensorboard_and_samples(setup, tmp_path):
    save = tmp_path / "lora"
    config = write_config(setup, save, val_manifest=str(setup / "val.jsonl"), save_interval=1, valid_interval=4, keep_last_n=2)
    result = _train_cli("lora", config)
    assert result.exit_code == 0, result.output
    assert "done: step 4/4" in result.output

    # keep_last_n: 2 prunes steps 1 and 2; latest names the newest
    assert sorted(p.name for p in save.glob("step_*")) == ["step_0000003", "step_0000004"]
    assert (save / "latest").read_text().strip() == "step_0000004"
    ckpt = save / "step_0000004"
    assert {p.name for p in ckpt.iterdir()} == GUIDE_LORA_FILES
    assert json.loads((ckpt / "training_state.json").read_text())["step"] == 4
    assert not list(save.glob(".*tmp*"))

    metrics = read_metrics(save)
    train_lines = [m for m in metrics if "loss/diff" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4]
    for key in ("loss/stop", "lr", "grad_norm", "audio_seconds_per_second", "loss/diff/dataset_0", "loss/diff/dataset_1"):
        assert all(key in m and m[key] == m[key] for m in train_lines), key
    val = [m for m in metrics if "val/loss/diff" in m]
    assert [m["step"] for m in val] == [4]
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (save / "samples" / "step_0000004").iterdir()) == ["val_0.wav", "val_1.wav"]

    # the adapter loads into a fresh LoRA model with nothing skipped, and it moved away from zero
    state_dict, meta = load_lora_dir(ckpt)
    assert meta["lora_config"]["r"] == 4 and meta["base_model"] == str(setup / "model")
    fresh = load_model_dir(setup / "model", lora=LoRAConfig(**meta["lora_config"]))
    loaded, skipped = load_lora_state_dict(fresh.model, state_dict, strict=True)
    assert skipped == [] and len(loaded) == len(state_dict) > 0
    assert all(k.endswith((".lora_A", ".lora_B")) for k in state_dict)
    assert max(float(v.abs().max()) for k, v in state_dict.items() if k.endswith("lora_B")) > 0

    # the same command again resumes from latest, which is the end: nothing to do, nothing rewritten
    again = _train_cli("lora", config)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    assert read_metrics(save) == metrics


def test_full_cli_checkpoint_is_a_loadable_model_dir(setup, tmp_path):
    save = tmp_path / "full"
    result = _train_cli("full", write_config(setup, save, lora=None, num_iters=2))
    assert result.exit_code == 0, result.output
    ckpt = save / "step_0000002"
    assert {p.name for p in ckpt.iterdir()} == GUIDE_FULL_FILES
    trained = load_model_dir(ckpt).model.state_dict()
    base = load_model_dir(setup / "model").model.state_dict()
    assert trained.keys() == base.keys()
    assert all(trained[k].dtype == torch.float32 for k in trained)
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2  # every weight trains, not only adapters


def test_official_fixture_checkpoints_match_the_reference_key_sets(setup, tmp_path, preset_dir):
    """On each official-format model (16 kHz and 44.1 kHz: the clips get resampled) both modes write
    exactly the reference's keys: the fixture's LoRA file and the base model.safetensors."""
    lora = json.loads((preset_dir / "lora" / "lora_config.json").read_text())["lora_config"]
    common = dict(pretrained_path=str(preset_dir / "base"), cache_dir=str(tmp_path / "latents"), num_iters=1)
    result = _train_cli("lora", write_config(setup, tmp_path / "lora", lora=lora, **common))
    assert result.exit_code == 0, result.output
    ours = load_file(tmp_path / "lora" / "step_0000001" / "lora_weights.safetensors")
    reference = load_file(preset_dir / "lora" / "lora_weights.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}

    result = _train_cli("full", write_config(setup, tmp_path / "full", lora=None, **common))
    assert result.exit_code == 0, result.output
    ours = load_file(tmp_path / "full" / "step_0000001" / "model.safetensors")
    reference = load_file(preset_dir / "base" / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_dry_run_reports_and_trains_nothing(setup, tmp_path):
    save = tmp_path / "dry"
    result = _train_cli("lora", write_config(setup, save, max_batch_tokens=40), "--dry-run")
    assert result.exit_code == 0, result.output
    for text in ("training clips", "over max_batch_tokens", "optimizer steps per epoch", "trainable parameters", "r 4, alpha 8"):
        assert text in result.output, text
    assert not list(save.glob("step_*"))
    defaults = _train_cli("lora", write_config(setup, tmp_path / "defaults", lora=None), "--dry-run")
    assert defaults.exit_code == 0 and "no lora: section" in defaults.output and "r 8, alpha 16" in defaults.output


def test_full_with_lora_section_and_unknown_key_are_clear_errors(setup, tmp_path):
    with pytest.raises(VoxCPMError, match="mode 'lora'"):
        trainer.train(load_train_config(write_config(setup, tmp_path / "x")), "full")
    result = _train_cli("full", write_config(setup, tmp_path / "x"))
    assert result.exit_code == 1 and "(voxcpm train lora)" in str(result.exception)
    result = _train_cli("lora", write_config(setup, tmp_path / "y"), "--set", "lora.alpah=8")
    assert result.exit_code == 1 and "did you mean 'lora.alpha'" in str(result.exception)
    assert "(--set)" in str(result.exception)  # the engine's "override", as this command's option


def test_bad_sample_stops_before_training_unless_skip_bad(setup, tmp_path):
    rows = [json.loads(line) for line in (setup / "train.jsonl").read_text().splitlines()]
    rows = [dict(row, audio=str(setup / row["audio"])) for row in rows]  # the manifest lives elsewhere
    manifest = write_manifest(tmp_path / "bad.jsonl", [*rows, {"audio": str(setup / "wavs/missing.wav"), "text": "gone"}])
    config = write_config(setup, tmp_path / "bad", train_manifest=str(manifest))
    result = _train_cli("lora", config)
    assert result.exit_code == 1 and "line 7" in str(result.exception) and "--skip-bad" in str(result.exception)
    assert not (tmp_path / "bad").exists()
    result = _train_cli("lora", config, "--skip-bad", "--set", "num_iters=1")
    assert result.exit_code == 0, result.output
    assert "line 7" in result.output and (tmp_path / "bad" / "step_0000001").is_dir()


# ---------------------------------------------------------------------------------------------- resume


class StopAt(trainer.Reporter):
    """Sends this process SIGTERM after step ``k``, as a scheduler preempting the job would."""

    def __init__(self, k):
        self.k = k

    def step(self, step, metrics):
        if step == self.k:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_after_sigterm_logs_the_same_losses(setup, tmp_path, mode):
    lora = dict(LORA, dropout=0.1) if mode == "lora" else None  # dropout: the RNG state must resume too
    extra = dict(num_iters=5, grad_accum_steps=2, batch_size=1)
    straight = tmp_path / "straight"
    trainer.train(load_train_config(write_config(setup, straight, lora=lora, **extra)), mode)

    resumed = tmp_path / "resumed"
    config = write_config(setup, resumed, lora=lora, **extra)
    first = trainer.train(load_train_config(config), mode, StopAt(2))
    assert first.signal == signal.SIGTERM and first.step == 2
    assert (resumed / "latest").read_text().strip() == "step_0000002"
    second = trainer.train(load_train_config(config), mode)
    assert second.signal is None and second.step == 5

    a, b = _losses(straight), _losses(resumed)
    assert [s for s, *_ in b] == [1, 2, 3, 4, 5]
    for (step, *la), (_, *lb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, rel=1e-6, abs=1e-7), step
    weights = "lora_weights.safetensors" if mode == "lora" else "model.safetensors"
    wa, wb = load_file(straight / "step_0000005" / weights), load_file(resumed / "step_0000005" / weights)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


# ---------------------------------------------------------------------------------------------- memory policy


class OpenMemoryBlocks(trainer.Reporter):
    """Records how many reusing_freed_memory blocks are open after each step."""

    def __init__(self):
        self.depths = []

    def step(self, step, metrics):
        self.depths.append(memory._depth)


@pytest.mark.skipif(memory._libc() is None, reason="the malloc policy needs glibc")
def test_training_reuses_freed_memory_only_while_it_runs(setup, tmp_path):
    """CPU steps keep freed memory for the next step; the run hands it back and restores malloc's policy."""
    probe = OpenMemoryBlocks()
    trainer.train(load_train_config(write_config(setup, tmp_path / "memory", num_iters=2)), "lora", probe)
    assert probe.depths == [1, 1] and memory._depth == 0


# ---------------------------------------------------------------------------------------------- checkpoint files


def _tiny_optim():
    layer = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(list(layer.named_parameters()), 0.1, 0.01)
    return optimizer, build_scheduler(optimizer, 1, 10)


def _save(save_path, step, optimizer, scheduler, keep=None):
    write = lambda folder: (folder / "weights.bin").write_bytes(b"w")  # noqa: E731
    return train_state.save_checkpoint(save_path, step, write, optimizer, scheduler, {"data": {}}, keep)


def test_keep_last_n_prunes_and_latest_follows(tmp_path):
    optimizer, scheduler = _tiny_optim()
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, optimizer, scheduler, keep=2)
    assert [p.name for p in train_state.complete_checkpoints(tmp_path)] == ["step_0000030", "step_0000040"]
    assert train_state.find_latest(tmp_path).name == "step_0000040"


def test_failed_save_leaves_no_half_written_checkpoint(tmp_path, monkeypatch):
    optimizer, scheduler = _tiny_optim()
    _save(tmp_path, 10, optimizer, scheduler)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("scheduler.pth"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_state.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 20, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000010"]
    assert train_state.find_latest(tmp_path).name == "step_0000010"
    # a step directory without training_state.json (e.g. copied by hand, cut short) is never resumed from
    (tmp_path / "step_0000030").mkdir()
    (tmp_path / "latest").unlink()
    assert train_state.find_latest(tmp_path).name == "step_0000010"
    # the temporary folder of a save killed outright (SIGKILL) is cleaned up by the next save
    (tmp_path / ".step_0000040.tmp-deadbeef").mkdir()
    monkeypatch.undo()
    _save(tmp_path, 50, optimizer, scheduler)
    assert not list(tmp_path.glob(".*tmp*"))
    assert train_state.find_latest(tmp_path).name == "step_0000050"


# ---------------------------------------------------------------------------------------------- NaN steps


def _nan_on(monkeypatch, bad_calls):
    """Make the model's per-sample losses NaN on the given forward calls (0-based)."""
    real_forward, calls = VoxCPMModel.forward, [0]

    def forward(self, batch, draws=None):
        out = real_forward(self, batch, draws)
        if calls[0] in bad_calls:
            out = dict(out, **{"loss/diff_per_sample": out["loss/diff_per_sample"] * float("nan")})
        calls[0] += 1
        return out

    monkeypatch.setattr(VoxCPMModel, "forward", forward)


def test_nan_steps_are_skipped_and_counted(setup, tmp_path, monkeypatch):
    _nan_on(monkeypatch, {1, 2})
    save = tmp_path / "nan"
    result = trainer.train(load_train_config(write_config(setup, save, num_iters=4)), "lora")
    assert result.step == 4 and result.nan_skipped == 2
    metrics = read_metrics(save)
    assert [m["nan_skipped"] for m in metrics] == [0, 1, 2, 2]
    assert [m["loss/diff"] != m["loss/diff"] for m in metrics] == [False, True, True, False]  # NaN != NaN


def test_ten_nan_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    _nan_on(monkeypatch, set(range(2, 100)))
    save = tmp_path / "nan10"
    config = load_train_config(write_config(setup, save, num_iters=30, save_interval=2, log_interval=5))
    with pytest.raises(VoxCPMError, match=r"NaN/inf for 10 steps in a row.*step_0000002"):
        trainer.train(config, "lora")
    assert [p.name for p in train_state.complete_checkpoints(save)] == ["step_0000002"]
    assert train_state.find_latest(save).name == "step_0000002"


# ---------------------------------------------------------------------------------------------- DDP


def test_torchrun_two_cpu_processes_match_one_process(setup, tmp_path):
    """2 ranks x grad_accum 1 see the same global batches as 1 process x grad_accum 2: same weights.

    batch_size 3 makes 2 batches per epoch, so no rank pads its share with repeated batches.
    """
    one = tmp_path / "one"
    trainer.train(load_train_config(write_config(setup, one, num_iters=3, batch_size=3, grad_accum_steps=2)), "lora")
    two = tmp_path / "two"
    config = write_config(setup, two, num_iters=3, batch_size=3, grad_accum_steps=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "voxcpm_cli", "train", "lora", "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done: step 3/3") == 1  # only rank 0 prints and writes

    a = load_file(one / "step_0000003" / "lora_weights.safetensors")
    b = load_file(two / "step_0000003" / "lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    losses_one, losses_two = _losses(one), _losses(two)
    assert [row[0] for row in losses_one] == [row[0] for row in losses_two]  # the same steps logged
    flat = [value for row in losses_one for value in row[1:]]
    assert flat == pytest.approx([value for row in losses_two for value in row[1:]], rel=1e-6)


# ---------------------------------------------------------------------------------------------- optimizer pieces


def test_schedule_warms_up_then_decays_to_zero_at_max_steps():
    factors = [lr_factor(s, 4, 20) for s in range(22)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[20] == factors[21] == 0.0 and 0.45 < factors[12] < 0.55


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(list(model.named_parameters()), 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
