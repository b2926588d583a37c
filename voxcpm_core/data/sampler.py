"""Length-bucketed batches of sample indices: at most ``batch_size`` samples and ``max_batch_tokens`` padded
positions each, in an order that depends only on (seed, epoch), sharded across DDP ranks and resumable."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches under a sample and a padded-token budget, resumable and shardable.

    Per epoch: shuffle with (seed, epoch), cut into pools of ``pool_batches * batch_size`` samples,
    sort each pool by length and fill batches greedily, then shuffle the batch order. Rank r of
    ``world_size`` takes global batches r, r + world_size, ...; the list is first padded by repeating
    its first batches so every rank runs the same number of steps. A sample longer than
    ``max_batch_tokens`` can never fit and is left out (``dropped``). Iterating continues from
    (epoch, position) and moves to the next epoch at the end.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        max_batch_tokens: int = 0,  # 0 = no token budget
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pool_batches: int = 50,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = shuffle
        self.pool_size = pool_batches * batch_size
        fits = [not max_batch_tokens or n <= max_batch_tokens for n in self.lengths]
        self.kept = [i for i, ok in enumerate(fits) if ok]
        self.dropped = [i for i, ok in enumerate(fits) if not ok]
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out on this rank

    def _fits(self, count: int, longest: int) -> bool:
        return count <= self.batch_size and (
            not self.max_batch_tokens or count * longest <= self.max_batch_tokens
        )

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in order (before sharding)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.kept).tolist() if self.shuffle else list(self.kept)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool_size):
            pool = sorted(order[start : start + self.pool_size], key=lambda i: self.lengths[i])
            current: list[int] = []
            for i in pool:  # ascending: sample i is the longest of the batch it joins
                if current and not self._fits(len(current) + 1, self.lengths[i]):
                    batches.append(current)
                    current = []
                current.append(i)
            if current:
                batches.append(current)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        batches = self.global_batches(epoch)
        if batches and len(batches) % self.world_size:
            pad = self.world_size - len(batches) % self.world_size
            batches = batches + (batches * pad)[:pad]
        return batches[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the count is the same every epoch up to pool effects)."""
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
