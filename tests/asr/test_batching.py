"""Batch samplers: coverage, frame budget, determinism, and both distributed sharding modes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.batching import BucketBatchSampler, DistributedBucketBatchSampler

lengths_st = st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=60)
common = st.fixed_dictionaries(
    {
        "max_frames": st.integers(min_value=50, max_value=4000),
        "num_buckets": st.integers(min_value=1, max_value=8),
        "shuffle": st.booleans(),
        "seed": st.integers(min_value=0, max_value=2**32),
    }
)
epochs = st.integers(min_value=0, max_value=20)


def padded(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def run_epoch(sampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    out = list(sampler)
    assert len(sampler) == len(out)
    return out


@settings(deadline=None)
@given(lengths_st, common, epochs)
def test_every_index_exactly_once_within_budget_unless_singleton(lengths, kw, epoch):
    batches = run_epoch(BucketBatchSampler(lengths, **kw), epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert b and all(isinstance(i, int) for i in b)
        assert padded(b, lengths) <= kw["max_frames"] or len(b) == 1


@settings(deadline=None)
@given(lengths_st, common, epochs, st.integers(min_value=1, max_value=5))
def test_max_batch_size_is_respected(lengths, kw, epoch, cap):
    batches = run_epoch(BucketBatchSampler(lengths, max_batch_size=cap, **kw), epoch)
    assert all(len(b) <= cap for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


@settings(deadline=None)
@given(lengths_st, common, epochs)
def test_same_seed_and_epoch_give_the_same_batches(lengths, kw, epoch):
    a = BucketBatchSampler(lengths, **kw)
    b = BucketBatchSampler(np.asarray(lengths, dtype=np.float32), **kw)
    run_epoch(a, epoch + 1)  # a different epoch in between must not leak into the next one
    assert run_epoch(a, epoch) == run_epoch(b, epoch) == a.batches(epoch)


def test_shuffled_epochs_and_seeds_differ():
    lengths = list(np.random.default_rng(1).integers(50, 500, size=200))
    s = BucketBatchSampler(lengths, max_frames=2000, num_buckets=4, seed=3)
    e0, e1 = run_epoch(s, 0), run_epoch(s, 1)
    assert e0 != e1
    assert sorted(map(sorted, e0)) != sorted(map(sorted, e1))  # batch contents differ, not only their order
    assert BucketBatchSampler(lengths, max_frames=2000, num_buckets=4, seed=4).batches(0) != e0


@settings(deadline=None)
@given(lengths_st, st.integers(min_value=50, max_value=4000), st.integers(min_value=1, max_value=8), epochs)
def test_unshuffled_batches_are_consecutive_runs_of_the_length_order(lengths, max_frames, num_buckets, epoch):
    s = BucketBatchSampler(lengths, max_frames=max_frames, num_buckets=num_buckets, shuffle=False)
    flat = [i for b in run_epoch(s, epoch) for i in b]
    assert flat == sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    assert run_epoch(s, epoch) == run_epoch(s, 0)


def test_bucketing_reduces_padding():
    lengths = list(np.random.default_rng(2).integers(10, 1000, size=300))
    waste = {}
    for nb in (1, 30):
        batches = BucketBatchSampler(lengths, max_frames=3000, num_buckets=nb, seed=0).batches(0)
        waste[nb] = sum(padded(b, lengths) for b in batches) - sum(lengths)
    assert waste[30] < waste[1] / 2


@settings(deadline=None)
@given(lengths_st, common, epochs)
def test_drop_last_only_drops_under_filled_remainders(lengths, kw, epoch):
    full = BucketBatchSampler(lengths, **kw).batches(epoch)
    kept = BucketBatchSampler(lengths, drop_last=True, **kw).batches(epoch)
    counts_full, counts_kept = Counter(map(tuple, full)), Counter(map(tuple, kept))
    assert counts_kept <= counts_full  # same batches, some left out
    dropped = counts_full - counts_kept
    assert sum(dropped.values()) <= min(kw["num_buckets"], len(lengths))  # at most one per bucket
    for b in dropped:
        assert (len(b) + 1) * max(lengths[i] for i in b) <= kw["max_frames"]  # it had room for more


def test_an_utterance_over_budget_is_its_own_batch():
    lengths = [10, 10, 5000, 10, 10]
    batches = BucketBatchSampler(lengths, max_frames=100, num_buckets=1, shuffle=False).batches(0)
    assert [2] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"lengths": []}, ValueError, "lengths"),
        ({"lengths": [1, -2]}, ValueError, r"lengths\[1\]"),
        ({"lengths": [1, float("nan")]}, ValueError, "lengths"),
        ({"lengths": [[1, 2]]}, ValueError, "1-D"),
        ({"lengths": ["a"]}, TypeError, "numbers"),
        ({"lengths": [True, False]}, TypeError, "numbers"),
        ({"max_frames": 0}, ValueError, "max_frames"),
        ({"max_frames": "10"}, TypeError, "max_frames"),
        ({"num_buckets": 0}, ValueError, "num_buckets"),
        ({"seed": -1}, ValueError, "seed"),
        ({"max_batch_size": 3, "batch_multiple": 2}, ValueError, "multiple"),
    ],
)
def test_bad_arguments_raise(kwargs, exc, word):
    args = {"lengths": [1, 2, 3], "max_frames": 10, **kwargs}
    with pytest.raises(exc, match=word):
        BucketBatchSampler(**args)
    with pytest.raises(ValueError, match="epoch"):
        BucketBatchSampler([1, 2], 10).set_epoch(-1)


# --- distributed -------------------------------------------------------------------------------------------


def rank_samplers(lengths, kw, replicas, **extra):
    return [
        DistributedBucketBatchSampler(lengths, **kw, num_replicas=replicas, rank=r, **extra)
        for r in range(replicas)
    ]


@settings(deadline=None)
@given(lengths_st, common, epochs, st.integers(min_value=1, max_value=4), st.booleans())
def test_batches_mode_even_counts_disjoint_and_covering(lengths, kw, epoch, replicas, pad):
    base = BucketBatchSampler(lengths, **kw).batches(epoch)
    per_rank = [run_epoch(s, epoch) for s in rank_samplers(lengths, kw, replicas, pad=pad)]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    taken = [tuple(b) for r in per_rank for b in r]
    n = len(base)
    if pad:
        # every base batch once, plus (-n % replicas) more taken cyclically from the start
        extra = [base[i % n] for i in range(-n % replicas)]
        assert Counter(taken) == Counter(map(tuple, base + extra))
    else:
        assert len(taken) == n - n % replicas
        assert Counter(taken) <= Counter(map(tuple, base))
    if n % replicas == 0 or not pad:
        flat = [i for b in taken for i in b]
        assert len(flat) == len(set(flat))  # disjoint within the epoch


@settings(deadline=None)
@given(lengths_st, common, epochs, st.integers(min_value=1, max_value=4))
def test_batches_mode_global_batches_are_the_ranks_steps(lengths, kw, epoch, replicas):
    samplers = rank_samplers(lengths, kw, replicas)
    per_rank = [run_epoch(s, epoch) for s in samplers]
    glob = samplers[0].global_batches(epoch)
    assert glob == [[i for b in step for i in b] for step in zip(*per_rank)]


@settings(deadline=None)
@given(lengths_st, common, epochs, st.sampled_from(["batches", "split_batches"]))
def test_one_replica_equals_the_plain_sampler(lengths, kw, epoch, shard):
    (single,) = rank_samplers(lengths, kw, 1, shard=shard)
    assert run_epoch(single, epoch) == run_epoch(BucketBatchSampler(lengths, **kw), epoch)
    assert single.global_batches(epoch) == BucketBatchSampler(lengths, **kw).batches(epoch)


@settings(deadline=None)
@given(lengths_st, common, epochs, st.integers(min_value=1, max_value=4))
def test_split_batches_parts_concatenate_to_the_global_batch(lengths, kw, epoch, replicas):
    samplers = rank_samplers(lengths, kw, replicas, shard="split_batches")
    per_rank = [run_epoch(s, epoch) for s in samplers]
    glob = samplers[0].global_batches(epoch)
    assert all(len(r) == len(glob) for r in per_rank)
    for step, g in enumerate(glob):
        parts = [r[step] for r in per_rank]
        assert len({len(p) for p in parts}) == 1 and parts[0]  # equal, non-empty parts
        assert [i for p in parts for i in p] == g
        assert padded(g, lengths) <= kw["max_frames"] or len(g) == replicas
    counts = Counter(i for g in glob for i in g)
    assert set(counts) == set(range(len(lengths)))  # everything covered
    # repeats only fill up each bucket's last group: fewer than `replicas` per bucket
    assert sum(counts.values()) - len(lengths) <= min(kw["num_buckets"], len(lengths)) * (replicas - 1)
    if len(lengths) % replicas == 0 and kw["num_buckets"] == 1:
        assert sum(counts.values()) == len(lengths)


def test_split_batches_reproduce_a_single_process_loss():
    """Mean of per-rank mean losses over equal parts equals the global batch's mean loss."""
    rng = np.random.default_rng(5)
    lengths = list(rng.integers(20, 400, size=64))
    per_utt_loss = rng.normal(size=64)
    samplers = rank_samplers(lengths, {"max_frames": 3000, "seed": 7}, 4, shard="split_batches")
    glob = samplers[0].global_batches(0)
    per_rank = [s.rank_batches() for s in samplers]
    for step, g in enumerate(glob):
        ddp = np.mean([per_utt_loss[r[step]].mean() for r in per_rank])
        np.testing.assert_allclose(ddp, per_utt_loss[g].mean(), rtol=1e-12)


def test_distributed_argument_checks():
    with pytest.raises(ValueError, match="rank"):
        DistributedBucketBatchSampler([1, 2], 10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="shard"):
        DistributedBucketBatchSampler([1, 2], 10, num_replicas=2, rank=0, shard="chunks")
    with pytest.raises(ValueError, match="num_replicas and rank"):
        DistributedBucketBatchSampler([1, 2], 10)  # torch.distributed is not initialised in tests
    s = DistributedBucketBatchSampler([1, 2], 10, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        s.rank_batches(rank=5)


def test_an_epoch_with_every_batch_dropped_is_empty_on_every_rank():
    # one under-filled bucket and drop_last: nothing is left, and padding must not invent batches
    for shard in ("batches", "split_batches"):
        for s in rank_samplers([3, 4], {"max_frames": 100, "drop_last": True}, 2, shard=shard):
            assert run_epoch(s, 0) == [] and s.global_batches() == []
