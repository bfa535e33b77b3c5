"""Duration-bucketing batch sampler: batches hold a bounded total of audio seconds.

Why buckets: padding is wasted compute, so an utterance is batched with others of similar length;
why a duration budget instead of a fixed batch size: a batch of short clips and one of long clips
then cost about the same, so memory is bounded and steps are comparable.

The order is a pure function of ``(seed, epoch)``: :meth:`DurationBucketSampler.epoch_batches`
recomputes any epoch's batches exactly, which is what makes mid-epoch resumption reproducible
(the training loop stores ``(epoch, batches_done)`` and :meth:`resume` skips that many).

Distributed training (``rank``/``world_size``): every rank computes the same global batch list
(the one a single process gets) and takes every ``world_size``-th batch from position ``rank``,
so ranks see disjoint batches, each within the same duration budget (similar work per rank), and
one global optimizer step of ``world_size`` ranks x ``grad_accum`` micro-batches holds exactly
the batches a single process with ``world_size * grad_accum`` accumulation steps would see. The
last ``len % world_size`` batches of an epoch are left out (a different few each epoch, as the
order is reshuffled), because every rank must run the same number of steps; with one process
nothing is left out. ``batches_done`` counts this rank's batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class DurationBucketSampler:
    """Yields lists of dataset indices whose durations sum to at most ``max_duration`` seconds.

    Utterances are sorted by duration and cut into ``num_buckets`` equal-count buckets (quantiles),
    so every bucket holds utterances of similar length whatever the duration distribution. Each
    epoch shuffles inside every bucket, packs each bucket greedily into batches, then shuffles the
    batches across buckets. An utterance longer than ``max_duration`` forms a batch on its own
    rather than being dropped silently. ``max_batch_size`` optionally caps the count as well.
    ``rank``/``world_size``: this process's share of every epoch (see the module docstring).
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_duration: float,
        *,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        max_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if max_duration <= 0:
            raise ValueError(f"max_duration must be positive, got {max_duration}")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of world_size {world_size} ranks")
        self.durations = np.asarray(durations, dtype=np.float64)
        if self.durations.ndim != 1 or (self.durations < 0).any():
            raise ValueError("durations must be a flat sequence of non-negative seconds")
        self.max_duration = float(max_duration)
        self.num_buckets = min(num_buckets, max(1, len(self.durations)))
        self.shuffle = shuffle
        self.seed = seed
        self.max_batch_size = max_batch_size
        self.rank, self.world_size = rank, world_size
        # Stable sort so equal durations keep manifest order: the buckets do not depend on
        # the sort algorithm's tie-breaking.
        order = np.argsort(self.durations, kind="stable")
        self._buckets = [b for b in np.array_split(order, self.num_buckets) if len(b)]
        self.epoch = 0
        self._start = 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` in order; deterministic in ``(seed, epoch)`` (and
        the rank and world size). With one process: all of them."""
        batches = self.global_batches(epoch)
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` in the order a single process sees them."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for bucket in self._buckets:
            members = rng.permutation(bucket) if self.shuffle else bucket
            batches.extend(self._pack(members))
        if self.shuffle:
            perm = rng.permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def _pack(self, members: np.ndarray) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        total = 0.0
        for idx in members.tolist():
            dur = float(self.durations[idx])
            full = self.max_batch_size is not None and len(current) >= self.max_batch_size
            if current and (total + dur > self.max_duration or full):
                batches.append(current)
                current, total = [], 0.0
            current.append(idx)
            total += dur
        if current:
            batches.append(current)
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch = epoch
        self._start = 0

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after its first ``batches_done`` batches (the loop's record)."""
        self.epoch = epoch
        self._start = batches_done

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self._start :]

    def __len__(self) -> int:
        """Batches left in the current epoch (all of them unless resumed mid-epoch)."""
        return len(self.epoch_batches(self.epoch)) - self._start

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self._start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"sampler seed {state['seed']} in the saved state differs from {self.seed}"
            )
        self.resume(int(state["epoch"]), int(state["batches_done"]))
