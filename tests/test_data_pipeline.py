"""Training data: latent cache (once, reused, invalidated, atomic), batching (budgets, order, ranks, resume),
and prepare_training_data (bad manifest lines, skip_bad, statistics)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import official_dir

from voxcpm_core.data import latent_cache
from voxcpm_core.data.audio import load_audio
from voxcpm_core.data.latent_cache import LatentCache
from voxcpm_core.data.pipeline import TOO_LONG, prepare_training_data
from voxcpm_core.data.sampler import BucketBatchSampler
from voxcpm_core.errors import VoxCPMError
from voxcpm_core.io.checkpoint import load_audio_vae, load_tokenizer, read_model_config
from voxcpm_core.training.config import data_spec, load_train_config

FILE_RATE = 22050  # the clips are resampled to the VAE's 16 kHz


@pytest.fixture(scope="module")
def loaded():
    """What prepare_training_data needs of a loaded model: the v1-tiny config, VAE and tokenizer."""
    base = official_dir("v1-tiny") / "base"
    config = read_model_config(base)
    return SimpleNamespace(config=config, vae=load_audio_vae(base, config), tokenizer=load_tokenizer(base))


def write_clip(path: Path, seconds: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FILE_RATE)) / FILE_RATE
    wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav.astype(np.float32), FILE_RATE)
    return path


def count_calls(monkeypatch, obj, name: str) -> list[int]:
    calls = [0]
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


# ----------------------------------------------------------------------------------------- latent cache


def test_cache_encodes_once_then_reuses(tmp_path, loaded, monkeypatch):
    clips = [write_clip(tmp_path / f"a{i}.wav", 0.4 + 0.3 * i, seed=i) for i in range(4)]
    clips.append(tmp_path / "copy.wav")
    clips[-1].write_bytes(clips[0].read_bytes())  # same content, another name: one entry
    vae, patch = loaded.vae, loaded.config.patch_size
    encodes = count_calls(monkeypatch, vae, "encode")
    progress = []
    cache = LatentCache(tmp_path / "cache", vae, patch, max_batch_clips=2)
    entries = cache.ensure(clips, lambda d, t: progress.append((d, t)))
    assert encodes[0] == 2 and progress == [(0, 4), (2, 4), (4, 4)]  # 4 distinct clips, 2 per VAE call
    assert entries[0] == entries[-1] and len(set(entries)) == 4

    patch_samples = vae.hop_length * patch
    for clip, entry in zip(clips, entries, strict=True):
        wav = load_audio(clip, vae.sample_rate)
        latents = LatentCache.load(entry)
        A = math.ceil(len(wav) / patch_samples)
        assert latents.shape == (A, patch, loaded.config.feat_dim)
        assert LatentCache.describe(entry) == (A, len(wav))
        # The batched encode equals encoding this clip alone, padded to a patch multiple, as [A, P, D].
        padded = torch.zeros(1, 1, A * patch_samples)
        padded[0, 0, : len(wav)] = torch.from_numpy(wav)
        with torch.no_grad():
            alone = vae.encode(padded)[0].T.reshape(A, patch, -1)
        torch.testing.assert_close(latents, alone, atol=1e-5, rtol=1e-4)

    encodes[0] = 0
    progress.clear()
    hashes = count_calls(monkeypatch, latent_cache, "file_sha256")
    again = LatentCache(tmp_path / "cache", vae, patch).ensure(clips, lambda d, t: progress.append((d, t)))
    assert again == entries and encodes[0] == 0 and progress == [(0, 0)]
    assert hashes[0] == 0  # size + mtime unchanged: the stored content hash is reused
    assert not list((tmp_path / "cache").rglob(".*.tmp-*"))


def test_cache_invalidated_when_vae_weights_or_audio_change(tmp_path, loaded, monkeypatch):
    clip = write_clip(tmp_path / "a.wav", 0.5, seed=0)
    patch = loaded.config.patch_size
    first = LatentCache(tmp_path / "cache", loaded.vae, patch)
    [entry] = first.ensure([clip])

    other_vae = copy.deepcopy(loaded.vae)
    with torch.no_grad():
        next(other_vae.parameters()).add_(0.01)
    encodes = count_calls(monkeypatch, other_vae, "encode")
    second = LatentCache(tmp_path / "cache", other_vae, patch)
    [other_entry] = second.ensure([clip])
    assert second.key != first.key and other_entry != entry and encodes[0] == 1
    assert not torch.equal(LatentCache.load(entry), LatentCache.load(other_entry))

    write_clip(clip, 0.9, seed=5)  # new content under the same name
    [new_entry] = first.ensure([clip])
    assert new_entry != entry and LatentCache.load(new_entry).shape[0] > LatentCache.load(entry).shape[0]


def test_ranks_share_the_encoding(tmp_path, loaded):
    clips = [write_clip(tmp_path / f"a{i}.wav", 0.3 + 0.1 * i, seed=i) for i in range(5)]
    caches = [LatentCache(tmp_path / "cache", loaded.vae, loaded.config.patch_size) for _ in range(2)]
    todo = []
    entries = caches[0].ensure(clips, lambda d, t: todo.append(t), rank=0, world_size=2)
    assert 0 < todo[0] < 5 and sum(e.is_file() for e in entries) == todo[0]  # rank 0's share
    # Rank 1 runs after rank 0 finished (the worst race): it still takes exactly the rest.
    assert caches[1].ensure(clips, lambda d, t: todo.append(t), rank=1, world_size=2) == entries
    assert todo[0] + todo[-1] == 5 and all(e.is_file() for e in entries)


def test_cache_writes_are_atomic(tmp_path, loaded, monkeypatch):
    clip = write_clip(tmp_path / "a.wav", 0.5, seed=0)
    cache = LatentCache(tmp_path / "cache", loaded.vae, loaded.config.patch_size)
    real_save = latent_cache.save_file

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(latent_cache, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure([clip])
    entry = cache.entry_path(cache.audio_sha256(clip))
    assert not entry.exists() and not list((tmp_path / "cache").rglob(".*.tmp-*"))
    monkeypatch.setattr(latent_cache, "save_file", real_save)
    assert cache.ensure([clip]) == [entry] and LatentCache.load(entry).shape[0] > 0


# ----------------------------------------------------------------------------------------- batch sampler


def random_lengths(n: int = 300, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(5, 300, size=n).tolist()


def test_batches_respect_budgets_and_drop_over_budget_samples():
    lengths = random_lengths() + [701]  # the last one cannot fit in any batch
    sampler = BucketBatchSampler(lengths, batch_size=8, max_batch_tokens=700, seed=1)
    assert sampler.dropped == [len(lengths) - 1]
    batches = sampler.batches(0)
    for batch in batches:
        assert 1 <= len(batch) <= 8
        assert len(batch) * max(lengths[i] for i in batch) <= 700
    seen = sorted(i for batch in batches for i in batch)
    assert seen == sampler.kept == list(range(len(lengths) - 1))  # each kept sample exactly once
    # Length bucketing keeps padding small compared with random batches of the same sizes.
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths[:-1]) / padded < 0.15


def test_order_is_deterministic_per_seed_and_epoch():
    lengths = random_lengths()

    def order(seed, epoch):
        return BucketBatchSampler(lengths, 8, 1200, seed=seed).batches(epoch)

    assert order(3, 0) == order(3, 0)
    assert order(3, 1) != order(3, 0)
    assert order(4, 0) != order(3, 0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_batches_covering_the_epoch(world_size):
    lengths = random_lengths()
    global_batches = BucketBatchSampler(lengths, 8, 1200, seed=2).global_batches(0)
    per_rank = [
        BucketBatchSampler(lengths, 8, 1200, seed=2, rank=r, world_size=world_size).batches(0)
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank
    flat = [tuple(b) for rank in per_rank for b in rank]
    assert set(flat) == {tuple(b) for b in global_batches}  # covering
    padding = len(flat) - len(global_batches)
    assert 0 <= padding < world_size and len(set(flat)) == len(global_batches)  # disjoint but for padding
    for r, rank in enumerate(per_rank):  # rank r takes global batches r, r + world_size, ...
        assert (
            rank[: len(global_batches) // world_size]
            == global_batches[r::world_size][: len(global_batches) // world_size]
        )


def test_resume_from_state_dict_continues_the_same_order():
    lengths = random_lengths(60)
    reference = BucketBatchSampler(lengths, 8, 1200, seed=5)
    stream = iter(reference)
    taken = [next(stream) for _ in range(len(reference) - 2)]
    state = reference.state_dict()
    expected = [*stream, *reference]  # the rest of epoch 0, then all of epoch 1

    resumed = BucketBatchSampler(lengths, 8, 1200, seed=5)
    resumed.load_state_dict(state)
    assert state == {"epoch": 0, "position": len(taken)}
    assert [*resumed, *resumed] == expected
    assert resumed.state_dict() == {"epoch": 2, "position": 0}


# ----------------------------------------------------------------------------------------- prepare_training_data


def make_dataset(tmp_path: Path, bad_line: bool = False, long_clip: bool = False) -> Path:
    texts = [
        "Hello world.",
        "你好，世界！",
        "A short line.",
        "Another sample here.",
        "测试一下。",
        "Last one.",
    ]
    lines = []
    for i, text in enumerate(texts):
        write_clip(tmp_path / "clips" / f"{i}.wav", 0.5 + 0.1 * i, seed=i)
        lines.append(
            json.dumps({"audio": f"clips/{i}.wav", "text": text, "dataset_id": i % 2}, ensure_ascii=False)
        )
    if bad_line:
        lines.insert(2, json.dumps({"audio": "clips/missing.wav", "text": "gone"}))
    if long_clip:
        write_clip(tmp_path / "clips" / "long.wav", 4.0, seed=9)
        lines.append(json.dumps({"audio": "clips/long.wav", "text": "a long one"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_clip(tmp_path / "clips" / "val.wav", 0.6, seed=7)
    (tmp_path / "val.jsonl").write_text(json.dumps({"audio": "clips/val.wav", "text": "Validation."}) + "\n")
    config = "train_manifest: train.jsonl\nval_manifest: val.jsonl\nsave_path: out\ncache_dir: cache\nbatch_size: 2\n"
    (tmp_path / "train.yaml").write_text(f"pretrained_path: {official_dir('v1-tiny') / 'base'}\n" + config)
    return tmp_path / "train.yaml"


def prepare(cfg, loaded, skip_bad=False):
    """prepare_training_data as the trainer calls it: with the config's data values at the model's rate."""
    return prepare_training_data(data_spec(cfg, loaded.config), loaded, skip_bad=skip_bad)


def test_prepare_builds_samples_stats_and_reuses_the_cache(tmp_path, loaded):
    cfg = load_train_config(make_dataset(tmp_path))
    data = prepare(cfg, loaded)
    assert len(data.train) == 6 and len(data.val) == 1 and data.dropped == []
    stats = data.stats
    assert (stats.clips, stats.val_clips, stats.per_dataset, stats.encoded) == (6, 1, {0: 3, 1: 3}, 7)
    assert stats.hours == pytest.approx(sum(0.5 + 0.1 * i for i in range(6)) / 3600, rel=1e-3)
    assert stats.batches_per_epoch == 3 and stats.steps_per_epoch == 3
    first = data.train.samples[0]
    assert first.text_ids == loaded.tokenizer.encode("Hello world.")
    assert first.length == len(first.text_ids) + first.num_patches + 2

    batch = data.train.batch([0, 1])
    assert batch.text_tokens.shape[0] == 2 and batch.dataset_ids.tolist() == [0, 1]
    assert batch.audio_feats.shape[2:] == (loaded.config.patch_size, loaded.config.feat_dim)
    assert sum(b.text_tokens.shape[0] for b in data.val_batches()) == 1

    again = prepare(cfg, loaded)
    assert again.stats.encoded == 0  # a second run (or a resume, or --dry-run) reads the cache


def test_train_loader_resumes_exactly(tmp_path, loaded):
    data = prepare(load_train_config(make_dataset(tmp_path)), loaded)
    loader = data.train_loader(num_workers=1)  # a worker prefetches; the state must not count that
    for _ in range(4):  # one epoch (3 batches) and one more
        next(loader)
    state = loader.state_dict()
    expected = [next(loader).text_tokens for _ in range(4)]
    resumed = data.train_loader()
    resumed.load_state_dict(state)
    assert state == {"epoch": 1, "position": 1}
    for want in expected:
        assert torch.equal(next(resumed).text_tokens, want)


def test_bad_manifest_lines_fail_before_training_or_are_skipped(tmp_path, loaded):
    cfg = load_train_config(make_dataset(tmp_path, bad_line=True))
    with pytest.raises(VoxCPMError) as exc:
        prepare(cfg, loaded)
    message = str(exc.value)
    assert "1 bad sample(s)" in message and "line 3:" in message and "missing.wav" in message
    assert "skip_bad" in message and exc.value.param == "skip_bad" and "\n" not in message
    assert not (tmp_path / "cache").exists()  # nothing was encoded

    data = prepare(cfg, loaded, skip_bad=True)
    assert len(data.train) == 6 and data.stats.bad == 1
    [dropped] = data.dropped
    assert (dropped.split, dropped.line, dropped.audio) == ("train", 3, "clips/missing.wav")
    assert any("line 3" in w for w in data.warnings)


def test_samples_over_max_batch_tokens_are_dropped_and_reported(tmp_path, loaded):
    cfg = load_train_config(make_dataset(tmp_path, long_clip=True), ["max_batch_tokens=40"])
    data = prepare(cfg, loaded)
    too_long = [d for d in data.dropped if d.kind == TOO_LONG]
    assert [d.line for d in too_long] == [7] and "max_batch_tokens 40" in too_long[0].reason
    assert data.stats.over_budget == 1 and len(data.train) == 6
    assert all(s.length <= 40 for s in data.train.samples)
    with pytest.raises(VoxCPMError, match="max_batch_tokens: 5 is below every training sample"):
        prepare(load_train_config(cfg.source, ["max_batch_tokens=5"]), loaded)
