"""Duration-bucketing sampler: budgets, coverage, determinism and mid-epoch resumption."""

from __future__ import annotations

import numpy as np
import pytest

from speechllama.data.sampler import DurationBucketSampler


def _durations(n: int = 200, seed: int = 3) -> list[float]:
    return np.random.default_rng(seed).uniform(0.5, 12.0, size=n).round(3).tolist()


def test_every_index_exactly_once_and_budget_respected() -> None:
    durs = _durations()
    sampler = DurationBucketSampler(durs, max_duration=30.0, num_buckets=6, seed=1)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(durs)))
    for batch in batches:
        assert sum(durs[i] for i in batch) <= 30.0
    # Greedy packing: all but the last batch of each bucket are nearly full, so the number of
    # batches stays close to the lower bound total / budget.
    assert len(batches) <= sum(durs) / 30.0 + 2 * 6


def test_buckets_group_similar_durations() -> None:
    durs = _durations(400)
    sampler = DurationBucketSampler(durs, max_duration=40.0, num_buckets=8, seed=0)
    spreads = [max(durs[i] for i in b) - min(durs[i] for i in b) for b in sampler]
    # One bucket covers about 1/8 of the 11.5 s range; unbucketed batches span most of it.
    assert max(spreads) < 11.5 / 8 * 1.6
    # Short utterances come in larger batches than long ones.
    sizes = {len(b): np.mean([durs[i] for i in b]) for b in sampler}
    assert sizes[max(sizes)] < sizes[min(sizes)]


def test_long_utterance_gets_own_batch_and_batch_size_cap() -> None:
    durs = [1.0] * 10 + [50.0]
    batches = list(DurationBucketSampler(durs, 20.0, num_buckets=1, max_batch_size=4, seed=0))
    assert [10] in batches
    assert max(len(b) for b in batches) == 4
    assert sorted(i for b in batches for i in b) == list(range(11))


def test_deterministic_given_seed_and_epoch() -> None:
    durs = _durations()
    a = DurationBucketSampler(durs, 25.0, seed=7)
    b = DurationBucketSampler(durs, 25.0, seed=7)
    assert a.epoch_batches(3) == b.epoch_batches(3)
    assert a.epoch_batches(0) != a.epoch_batches(1)  # a new order every epoch
    assert a.epoch_batches(0) != DurationBucketSampler(durs, 25.0, seed=8).epoch_batches(0)


def test_resume_mid_epoch_gives_same_remaining_order() -> None:
    durs = _durations()
    full = DurationBucketSampler(durs, 25.0, seed=5)
    full.set_epoch(2)
    reference = list(full)
    resumed = DurationBucketSampler(durs, 25.0, seed=5)
    resumed.load_state_dict({"seed": 5, "epoch": 2, "batches_done": 7})
    assert len(resumed) == len(reference) - 7
    assert list(resumed) == reference[7:]
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"seed": 6, "epoch": 2, "batches_done": 7})


def test_no_shuffle_is_sorted_and_bad_arguments_refused() -> None:
    durs = [3.0, 1.0, 2.0]
    assert list(DurationBucketSampler(durs, 100.0, num_buckets=1, shuffle=False)) == [[1, 2, 0]]
    with pytest.raises(ValueError):
        DurationBucketSampler(durs, 0.0)
    with pytest.raises(ValueError):
        DurationBucketSampler([-1.0], 10.0)
