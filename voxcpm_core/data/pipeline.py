"""Training data: manifest -> checked samples -> cached latents -> length-bucketed batches.

``prepare_training_data`` is the one call the trainer (and ``--dry-run``) makes. Batches are lists
of sample indices from ``BucketBatchSampler``: each holds at most ``batch_size`` samples and at most
``max_batch_tokens`` padded positions (samples x longest length). The order depends only on
(seed, epoch); DDP ranks take disjoint batches of that same global order; ``state_dict`` records
(epoch, position) so a resumed run continues with exactly the batches it had not seen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from voxcpm_core.data.collate import TrainBatch, collate
from voxcpm_core.data.latent_cache import LatentCache, ProgressFn, check_cache_dir
from voxcpm_core.data.manifest import ManifestEntry
from voxcpm_core.data.sampler import BucketBatchSampler
from voxcpm_core.data.tokenizer import sequence_length
from voxcpm_core.data.validate import validate_manifest
from voxcpm_core.errors import VoxCPMError

SHOWN_BAD = 5  # bad samples quoted in an error message


@dataclass(frozen=True)
class Sample:
    """One clip ready for training: tokenized text and the cache entry of its latents."""

    text: str
    text_ids: list[int]
    latents: Path  # cache entry holding [A, P, D]
    num_patches: int  # A
    seconds: float  # audio duration
    dataset_id: int
    audio: Path
    line: int  # manifest line

    @property
    def length(self) -> int:
        return sequence_length(len(self.text_ids), self.num_patches)


BAD, TOO_LONG = "bad", "too_long"  # why a sample was dropped


@dataclass(frozen=True)
class DroppedSample:
    split: str  # "train" or "val"
    line: int
    audio: str
    reason: str
    kind: str  # BAD (manifest check failed, skip_bad) or TOO_LONG (over max_batch_tokens)


class TrainDataset(Dataset):
    """``dataset[i]`` = (text_ids, latents [A, P, D], dataset_id), the item ``collate`` takes."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[list[int], torch.Tensor, int]:
        s = self.samples[index]
        return s.text_ids, LatentCache.load(s.latents), s.dataset_id

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]

    def batch(self, indices: Sequence[int]) -> TrainBatch:
        return collate([self[i] for i in indices])


class TrainLoader:
    """Endless ``TrainBatch`` stream over epochs; ``state_dict`` counts the batches taken from it.

    Counting here (not in the sampler) keeps the state exact when DataLoader workers prefetch.
    """

    def __init__(self, dataset: TrainDataset, sampler: BucketBatchSampler, num_workers: int = 0):
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.epoch, self.position = sampler.epoch, sampler.position
        self._batches: Iterator[TrainBatch] | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> TrainBatch:
        for _ in range(2):  # at most one epoch boundary per batch
            if self._batches is None:
                self.sampler.load_state_dict(self.state_dict())
                loader = DataLoader(
                    self.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=self.num_workers
                )
                self._batches = iter(loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches = None
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += 1
            return batch
        raise VoxCPMError("the training data yields no batches; check max_batch_tokens and the manifest")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = None


@dataclass
class DataStats:
    clips: int
    hours: float
    per_dataset: dict[int, int]  # dataset_id -> clips
    per_dataset_hours: dict[int, float]
    val_clips: int
    bad: int  # manifest samples dropped by skip_bad (train + val)
    over_budget: int  # samples longer than max_batch_tokens (train + val)
    batches_per_epoch: int  # micro-batches per epoch on one rank
    steps_per_epoch: float  # optimizer steps per epoch (batches / grad_accum_steps)
    padding: float  # fraction of padded positions in an epoch's batches
    encoded: int  # clips the VAE encoded now (the rest came from the cache)
    max_length: int  # longest kept sample, in positions


@dataclass
class PreparedData:
    """Everything the training loop needs from the data side."""

    train: TrainDataset
    val: TrainDataset | None
    dropped: list[DroppedSample]
    stats: DataStats
    batch_size: int
    max_batch_tokens: int
    seed: int
    warnings: list[str] = field(default_factory=list)

    def train_sampler(self, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
        return BucketBatchSampler(
            self.train.lengths, self.batch_size, self.max_batch_tokens, self.seed, rank, world_size
        )

    def train_loader(self, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> TrainLoader:
        return TrainLoader(self.train, self.train_sampler(rank, world_size), num_workers)

    def val_batches(self, rank: int = 0, world_size: int = 1) -> Iterator[TrainBatch]:
        """Validation batches in a fixed order (length-bucketed, no shuffling)."""
        if self.val is None:
            return iter(())
        sampler = BucketBatchSampler(
            self.val.lengths,
            self.batch_size,
            self.max_batch_tokens,
            self.seed,
            rank,
            world_size,
            shuffle=False,
        )
        return (self.val.batch(indices) for indices in sampler.batches(0))


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _checked_entries(
    split: str, manifest: Path, sample_rate: int, skip_bad: bool
) -> tuple[list[ManifestEntry], list[DroppedSample]]:
    """Good manifest entries; bad ones raise (listing the first few) or, with skip_bad, are dropped."""
    report = validate_manifest(manifest, sample_rate=sample_rate)
    whole = [i for i in report.errors if i.line is None]
    if whole:
        raise VoxCPMError(f"{manifest}: {whole[0].message}")
    first_error: dict[int, str] = {}
    for issue in report.errors:
        first_error.setdefault(issue.line, issue.message)
    if first_error and not skip_bad:
        shown = "; ".join(f"line {line}: {msg}" for line, msg in list(first_error.items())[:SHOWN_BAD])
        more = f"; ... and {len(first_error) - SHOWN_BAD} more" if len(first_error) > SHOWN_BAD else ""
        raise VoxCPMError(
            f"{manifest}: {len(first_error)} bad sample(s) in the {split} manifest: {shown}{more}; "
            "fix them (validate_manifest lists them all) or set skip_bad to drop them",
            param="skip_bad",
        )
    audio_of = {e.line: e.audio_raw for e in report.entries}
    dropped = [
        DroppedSample(split, line, audio_of.get(line, ""), msg, BAD) for line, msg in first_error.items()
    ]
    return report.good_entries(), dropped


def _samples(
    entries: list[ManifestEntry], cache_entries: list[Path], tokenizer, sample_rate: int
) -> list[Sample]:
    samples = []
    for e, entry in zip(entries, cache_entries, strict=True):
        num_patches, num_samples = LatentCache.describe(entry)
        text_ids = tokenizer.encode(e.text)
        samples.append(
            Sample(
                e.text, text_ids, entry, num_patches, num_samples / sample_rate, e.dataset_id, e.audio, e.line
            )
        )
    return samples


@dataclass(frozen=True)
class DataSpec:
    """What the data side takes from a training config, as plain values (the config's schema lives above data/)."""

    train_manifest: Path
    val_manifest: Path | None  # None = no validation split
    cache_dir: Path  # latent cache root
    sample_rate: int  # the model's VAE rate, already checked against the config; clips are resampled to it
    batch_size: int
    max_batch_tokens: int  # 0 = no budget
    grad_accum_steps: int  # only for the statistics (optimizer steps per epoch)
    seed: int
    source: str = "<config>"  # where the values come from, for error messages


def prepare_training_data(
    spec: DataSpec, loaded_model, progress: ProgressFn | None = None, skip_bad: bool = False
) -> PreparedData:
    """Check the manifests, fill the latent cache, tokenize, and plan batches.

    ``loaded_model`` needs ``config`` (VoxCPMConfig), ``vae`` and ``tokenizer`` (a ``LoadedModel``).
    ``progress(done, total)`` follows the VAE encoding of clips missing from the cache. Under
    torch.distributed each rank encodes a share of the missing clips, then all ranks wait for each other.
    """
    splits = {"train": spec.train_manifest} | ({"val": spec.val_manifest} if spec.val_manifest else {})
    entries: dict[str, list[ManifestEntry]] = {}
    dropped: list[DroppedSample] = []
    for split, manifest in splits.items():
        entries[split], bad = _checked_entries(split, Path(manifest), spec.sample_rate, skip_bad)
        dropped += bad
    if not entries["train"]:
        raise VoxCPMError(f"{spec.train_manifest}: no usable training samples left; fix the manifest")

    cache = LatentCache(check_cache_dir(spec.cache_dir), loaded_model.vae, loaded_model.config.patch_size)
    rank, world_size = _dist_rank_world()
    all_entries = entries["train"] + entries.get("val", [])
    encoded: list[int] = [0]

    def count(done: int, total: int) -> None:
        encoded[0] = done
        if progress is not None:
            progress(done, total)

    cache_entries = cache.ensure([e.audio for e in all_entries], count, rank, world_size)
    if world_size > 1:
        torch.distributed.barrier()
    n_train = len(entries["train"])
    train = TrainDataset(
        _samples(entries["train"], cache_entries[:n_train], loaded_model.tokenizer, spec.sample_rate)
    )
    val = None
    if "val" in entries:
        val = TrainDataset(
            _samples(entries["val"], cache_entries[n_train:], loaded_model.tokenizer, spec.sample_rate)
        )

    budget = spec.max_batch_tokens
    for split, dataset in (("train", train), ("val", val)):
        if dataset is None or not budget:
            continue
        fits = [s.length <= budget for s in dataset.samples]
        if split == "train" and not any(fits):
            shortest = min(s.length for s in dataset.samples)
            raise VoxCPMError(
                f"{spec.source}: max_batch_tokens: {budget} is below every training sample "
                f"(the shortest needs {shortest} positions); raise it, e.g. max_batch_tokens: {8 * shortest}",
                param="overrides",
                value=f"max_batch_tokens={8 * shortest}",
            )
        dropped += [
            DroppedSample(
                split, s.line, str(s.audio), f"{s.length} positions > max_batch_tokens {budget}", TOO_LONG
            )
            for s, ok in zip(dataset.samples, fits, strict=True)
            if not ok
        ]
        dataset.samples = [s for s, ok in zip(dataset.samples, fits, strict=True) if ok]

    sampler = BucketBatchSampler(train.lengths, spec.batch_size, budget, spec.seed, rank, world_size)
    stats = _stats(train, val, dropped, sampler, spec.grad_accum_steps, encoded[0])
    warnings = [f"{d.split} manifest line {d.line} ({d.audio}): dropped, {d.reason}" for d in dropped]
    return PreparedData(train, val, dropped, stats, spec.batch_size, budget, spec.seed, warnings)


def _stats(
    train: TrainDataset,
    val: TrainDataset | None,
    dropped: list[DroppedSample],
    sampler: BucketBatchSampler,
    grad_accum_steps: int,
    encoded: int,
) -> DataStats:
    per_dataset = Counter(s.dataset_id for s in train.samples)
    hours: Counter[int] = Counter()
    for s in train.samples:
        hours[s.dataset_id] += s.seconds / 3600
    lengths = sampler.lengths
    padded = sum(len(b) * max(lengths[i] for i in b) for b in sampler.global_batches(0))
    batches = len(sampler)
    return DataStats(
        clips=len(train),
        hours=sum(hours.values()),
        per_dataset=dict(sorted(per_dataset.items())),
        per_dataset_hours=dict(sorted(hours.items())),
        val_clips=len(val) if val is not None else 0,
        bad=sum(d.kind == BAD for d in dropped),
        over_budget=sum(d.kind == TOO_LONG for d in dropped),
        batches_per_epoch=batches,
        steps_per_epoch=batches / grad_accum_steps,
        padding=1 - sum(lengths) / padded,
        encoded=encoded,
        max_length=max(lengths),
    )
