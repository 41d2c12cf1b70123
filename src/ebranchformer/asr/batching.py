"""Length-bucketed dynamic batching by total padded frames, single-process and distributed.

:class:`BucketBatchSampler` yields lists of dataset indices (a ``batch_sampler`` for
``torch.utils.data.DataLoader``). One epoch is built as follows, all randomness drawn from
``numpy.random.default_rng([seed, epoch])`` so it is the same on every process and every run:

1. sort the utterances by length (ties in random order when shuffling) and cut the sorted order into
   ``num_buckets`` buckets of nearly equal count;
2. within each bucket (shuffled when ``shuffle``), pack greedily: an utterance joins the open batch while
   ``batch_size * longest <= max_frames`` (the padded size of the batch) and, if set, ``batch_size <=
   max_batch_size``; otherwise the batch is closed and a new one opened. **An utterance longer than
   ``max_frames`` on its own becomes a batch of its own** (it is never dropped);
3. with ``drop_last``, the last batch of each bucket is dropped if it still had room for one more utterance of
   its own longest length (an under-filled remainder), much as ``BatchSampler(drop_last=True)`` drops a short
   final batch; without it every utterance appears exactly once per epoch;
4. the batches of all buckets are shuffled together (or kept short-to-long when ``shuffle=False``).

``lengths`` may be durations in seconds or frame counts; ``max_frames`` is in the same unit.

:class:`DistributedBucketBatchSampler` shards this for ``num_replicas`` processes, in one of two modes:

- ``shard="batches"`` (default): rank ``r`` takes global batches ``r, r + R, r + 2R, ...`` (``R =
  num_replicas``). So that every rank runs the same number of steps, the batch list is **padded by repeating
  its first batches** (cyclically if it holds fewer than ``R``; ``pad=True``, the default; a few utterances
  are then seen twice in that epoch) or its last ``len % R`` batches are dropped (``pad=False``). Without
  padding the ranks' batches are disjoint.
- ``shard="split_batches"``: every global batch is cut into ``R`` equal, contiguous parts and rank ``r`` takes
  part ``r``; the parts concatenated in rank order give the global batch back, so a DDP run with per-utterance
  mean losses equals a single-process run on :meth:`DistributedBucketBatchSampler.global_batches`. To make the
  parts equal, global batches are packed in groups of ``R`` utterances (``batch_multiple=R``): ``max_frames``
  bounds the *global* batch, a group longer than ``max_frames`` becomes a batch of its own, and a bucket whose
  size is not a multiple of ``R`` has its last group filled up by repeating that group's own utterances.

With ``num_replicas=1`` both modes give exactly the batches of :class:`BucketBatchSampler`.

Example:
    >>> lengths = [120, 80, 300, 95, 410, 60, 250, 130]
    >>> sampler = BucketBatchSampler(lengths, max_frames=600, num_buckets=2, seed=0)
    >>> sampler.set_epoch(0)
    >>> sorted(i for batch in sampler for i in batch)
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> all(len(b) * max(lengths[i] for i in b) <= 600 for b in sampler)
    True
    >>> # DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_audio)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler", "DistributedBucketBatchSampler"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_lengths(lengths: object) -> np.ndarray:
    try:
        arr = np.asarray(lengths)
    except Exception as e:
        raise TypeError(f"lengths must be a 1-D sequence of numbers, got {type(lengths).__name__}") from e
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"lengths must hold numbers (durations or frame counts), got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        bad = int(np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))[0])
        raise ValueError(f"lengths must all be finite and > 0, got lengths[{bad}]={arr[bad]!r}")
    return arr


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices with at most ``max_frames`` padded frames each, from length buckets (see module doc).

    Args:
        lengths: per-utterance durations or frame counts, shape (N,), all > 0.
        max_frames: budget of padded frames per batch, ``batch_size * longest`` (same unit as ``lengths``).
        num_buckets: number of length buckets (default 10; capped at N).
        shuffle: randomise the buckets' contents and the batch order (default True).
        seed: base seed, an int >= 0 (default 0); the epoch's randomness is ``default_rng([seed, epoch])``.
        drop_last: drop each bucket's under-filled last batch (default False: every utterance once per epoch).
        max_batch_size: optional cap on utterances per batch (default None: no cap).
        batch_multiple: batch sizes are multiples of this (default 1); a bucket's last group is filled up by
            repeating its own utterances. Used by ``DistributedBucketBatchSampler(shard="split_batches")``.

    Call :meth:`set_epoch` before each epoch; ``len(sampler)`` is the number of batches of the current epoch.
    """

    def __init__(
        self,
        lengths: Sequence[float] | np.ndarray,
        max_frames: float,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_batch_size: int | None = None,
        batch_multiple: int = 1,
    ) -> None:
        self.lengths = _check_lengths(lengths)
        if isinstance(max_frames, bool) or not isinstance(max_frames, (int, float, np.number)):
            raise TypeError(f"max_frames must be a number, got {type(max_frames).__name__}")
        if not math.isfinite(max_frames) or max_frames <= 0:
            raise ValueError(f"max_frames must be finite and > 0, got {max_frames!r}")
        self.max_frames = float(max_frames)
        self.num_buckets = _check_int("num_buckets", num_buckets, 1)
        self.seed = _check_int("seed", seed, 0)
        self.batch_multiple = _check_int("batch_multiple", batch_multiple, 1)
        if max_batch_size is not None:
            max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
            if max_batch_size % self.batch_multiple:
                raise ValueError(
                    f"max_batch_size={max_batch_size} must be a multiple of batch_multiple={self.batch_multiple}"
                )
        self.max_batch_size = max_batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (deterministic from ``seed`` and ``epoch``)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def _has_room(self, size: int, longest: float) -> bool:
        """Whether a batch of ``size`` with this longest utterance could take one more group."""
        grown = size + self.batch_multiple
        if self.max_batch_size is not None and grown > self.max_batch_size:
            return False
        return grown * longest <= self.max_frames

    def _pack(self, bucket: np.ndarray) -> list[list[int]]:
        """Greedy packing of one bucket (indices in visiting order) in groups of ``batch_multiple``."""
        m = self.batch_multiple
        if len(bucket) % m:
            tail = bucket[len(bucket) - len(bucket) % m :]
            bucket = np.concatenate(
                [bucket[: len(bucket) - len(tail)], np.resize(tail, m)]
            )  # (k*m,) cycles tail
        ids = bucket.tolist()
        group_longest = self.lengths[bucket].reshape(-1, m).max(axis=1).tolist()  # (k*m,) -> (k, m) -> (k,)
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0.0
        for g, glong in enumerate(group_longest):
            if batch and not self._has_room(len(batch), max(longest, glong)):
                batches.append(batch)
                batch, longest = [], 0.0
            batch.extend(ids[g * m : (g + 1) * m])
            longest = max(longest, glong)
        if batch and not (self.drop_last and self._has_room(len(batch), longest)):
            batches.append(batch)
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), in the order ``__iter__`` yields them."""
        return [list(b) for b in self._epoch_batches(epoch)]

    def _epoch_batches(self, epoch: int | None) -> list[list[int]]:
        """The epoch's batches, cached for the last epoch asked for (callers must not modify them)."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        if self.shuffle:
            perm = rng.permutation(n)  # (N,) random tie order
            order = perm[np.argsort(self.lengths[perm], kind="stable")]  # (N,) by length
        else:
            order = np.argsort(self.lengths, kind="stable")  # (N,) by length
        out: list[list[int]] = []
        for bucket in np.array_split(order, min(self.num_buckets, n)):
            out.extend(self._pack(rng.permutation(bucket) if self.shuffle else bucket))
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        self._cache = (epoch, out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return (list(b) for b in self._epoch_batches(None))

    def __len__(self) -> int:
        return len(self._epoch_batches(None))


class DistributedBucketBatchSampler(Sampler[list[int]]):
    """The batches of :class:`BucketBatchSampler`, sharded over ``num_replicas`` ranks (see module doc).

    Args:
        lengths, max_frames, num_buckets, shuffle, seed, drop_last, max_batch_size: as for
            :class:`BucketBatchSampler` (in ``"split_batches"`` mode ``max_frames`` and ``max_batch_size``
            bound the global batch, summed over ranks).
        num_replicas: number of ranks; default ``torch.distributed.get_world_size()`` (must be initialised).
        rank: this process's rank in ``[0, num_replicas)``; default ``torch.distributed.get_rank()``.
        shard: ``"batches"`` (default: whole batches per rank) or ``"split_batches"`` (every global batch cut
            into ``num_replicas`` equal parts).
        pad: ``"batches"`` mode only: make the batch count a multiple of ``num_replicas`` by repeating the
            epoch's first batches, cyclically (True, default) or by dropping its last ``len % num_replicas`` (False).

    Example:
        >>> lengths = [100, 200, 150, 90, 300, 120]
        >>> parts = [DistributedBucketBatchSampler(lengths, 600, num_replicas=2, rank=r, shard="split_batches")
        ...          for r in range(2)]
        >>> glob = parts[0].global_batches()
        >>> [a + b for a, b in zip(parts[0], parts[1])] == glob
        True
    """

    def __init__(
        self,
        lengths: Sequence[float] | np.ndarray,
        max_frames: float,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_batch_size: int | None = None,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shard: Literal["batches", "split_batches"] = "batches",
        pad: bool = True,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "num_replicas and rank must be given when torch.distributed is not initialised"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {self.rank}")
        if shard not in ("batches", "split_batches"):
            raise ValueError(f"shard must be 'batches' or 'split_batches', got {shard!r}")
        self.shard = shard
        self.pad = bool(pad)
        self.base = BucketBatchSampler(
            lengths,
            max_frames,
            num_buckets=num_buckets,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            max_batch_size=max_batch_size,
            batch_multiple=self.num_replicas if shard == "split_batches" else 1,
        )

    @property
    def epoch(self) -> int:
        return self.base.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; every rank must call it with the same value."""
        self.base.set_epoch(epoch)

    def _even_batches(self, epoch: int | None) -> list[list[int]]:
        """``"batches"`` mode: the epoch's batches, padded or cut to a multiple of ``num_replicas``."""
        glob = self.base._epoch_batches(epoch)
        r, n = self.num_replicas, len(glob)
        if self.pad and n:
            return glob + [list(glob[i % n]) for i in range(-n % r)]
        return glob[: n - n % r]

    def rank_batches(self, rank: int | None = None, epoch: int | None = None) -> list[list[int]]:
        """The batches of ``rank`` (default: this sampler's) for ``epoch`` (default: the current one)."""
        rank = self.rank if rank is None else _check_int("rank", rank, 0)
        if rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {rank}")
        if self.shard == "batches":
            return [list(b) for b in self._even_batches(epoch)[rank :: self.num_replicas]]
        out = []
        for batch in self.base._epoch_batches(epoch):
            k = len(batch) // self.num_replicas  # every global batch size is a multiple of num_replicas
            out.append(batch[rank * k : (rank + 1) * k])
        return out

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Per step, all ranks' batches concatenated in rank order: what a single-process run would use."""
        if self.shard == "split_batches":
            return self.base.batches(epoch)
        even = self._even_batches(epoch)
        r = self.num_replicas
        return [[i for b in even[s : s + r] for i in b] for s in range(0, len(even), r)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rank_batches())

    def __len__(self) -> int:
        n = len(self.base)
        if self.shard == "split_batches":
            return n
        return -(-n // self.num_replicas) if self.pad else n // self.num_replicas
