"""``AudioDataset`` (utterances -> waveforms and token ids, bad items skipped) and ``collate_audio`` (padding).

A bad item never crashes an epoch: ``dataset[i]`` returns None and records why in ``dataset.skips`` (a
:class:`~ebranchformer.asr.skip_report.SkipReport`) under ``"missing audio"``, ``"unreadable audio"``
(corrupt or not audio) or ``"empty tokens"`` (the tokenizer gave no ids). Audio at another sample rate is
resampled by :func:`~ebranchformer.asr.audio.load_audio`. ``collate_audio`` drops the None items and returns None
when a whole batch was bad, so a training loop skips ``None`` batches.

**Skips with DataLoader workers.** Every worker process holds its own copy of the dataset, so with
``num_workers > 0`` the main process's ``dataset.skips`` stays empty. Use ``collate_fn=dataset.collate``: it
collates like ``collate_audio`` and adds ``batch["skips"]``, the skips this process recorded since its previous
batch, which the main process merges (``total = total.merge(batch["skips"])``) whatever ``num_workers`` is.
Skips recorded while building a batch that came out None ride along with the same worker's next batch; those of
a worker's very last, all-bad batches of an epoch are only in that worker's copy. With ``num_workers=0`` (the
DataLoader default) ``dataset.skips`` holds everything.

This module also re-exports the rest of the data pipeline (manifests, ``SkipReport``, the batch samplers) so
``from ebranchformer.asr.data import ...`` reaches all of it.

Example:
    >>> from torch.utils.data import DataLoader
    >>> utts, manifest_skips = read_jsonl_manifest("train.jsonl")  # doctest: +SKIP
    >>> ds = AudioDataset(utts, tokenizer=tok)  # doctest: +SKIP
    >>> sampler = BucketBatchSampler(ds.durations, max_frames=200.0)  # seconds of padded audio per batch
    ... # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     if batch is None:
    ...         continue
    ...     wav, wav_lengths = batch["wav"], batch["wav_lengths"]  # (B, S) float32, (B,) int64
    ...     tokens, token_lengths = batch["tokens"], batch["token_lengths"]  # (B, U) int64 padded -1, (B,)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ebranchformer.asr.audio import AudioError, load_audio
from ebranchformer.asr.batching import BucketBatchSampler, DistributedBucketBatchSampler
from ebranchformer.asr.manifest import (
    Utterance,
    read_jsonl_manifest,
    read_librispeech_dir,
    write_jsonl_manifest,
)
from ebranchformer.asr.skip_report import SkipReport

__all__ = [
    "TOKEN_PAD",
    "AudioDataset",
    "BucketBatchSampler",
    "DistributedBucketBatchSampler",
    "SkipReport",
    "TextEncoder",
    "Utterance",
    "collate_audio",
    "read_jsonl_manifest",
    "read_librispeech_dir",
    "write_jsonl_manifest",
]

TOKEN_PAD = -1
"""Padding value of ``batch["tokens"]`` beyond each row's ``token_lengths``."""


class TextEncoder(Protocol):
    """What :class:`AudioDataset` needs of a tokenizer: ``encode(text) -> list[int]`` (ids >= 0)."""

    def encode(self, text: str) -> list[int]: ...


def _token_tensor(ids: Any, utt_id: str) -> torch.Tensor:
    """The tokenizer's output as a LongTensor (U,); a wrong type or a negative id is a bug, so it raises."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(
            f"tokenizer.encode must return a flat list of ints, got {type(ids).__name__} "
            f"with dtype {arr.dtype} and shape {arr.shape} for utterance {utt_id!r}"
        )
    tokens = torch.as_tensor(arr.astype(np.int64))  # (U,)
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(
            f"tokenizer.encode returned a negative id for utterance {utt_id!r}: {tokens.tolist()}"
        )
    return tokens


class AudioDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Utterance` records (see the module doc for skipping and workers).

    Args:
        utterances: the utterances (a sequence of :class:`Utterance`).
        tokenizer: None (default) or any object with ``encode(text) -> list[int]``.
        sample_rate: rate the audio is resampled to (default 16000).

    ``dataset[i]`` is ``{"id": str, "wav": float32 (S,), "text": str}`` plus ``"tokens"`` int64 (U,) with a
    tokenizer, or None for a bad item. ``dataset.durations`` are the manifest durations, for the samplers.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        tokenizer: TextEncoder | None = None,
        sample_rate: int = 16000,
    ) -> None:
        utterances = list(utterances)
        for i, u in enumerate(utterances):
            if not isinstance(u, Utterance):
                raise TypeError(f"utterances[{i}] must be an Utterance, got {type(u).__name__}")
        if tokenizer is not None and not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(
                f"tokenizer must have an encode(text) -> list[int] method, got {type(tokenizer).__name__}"
            )
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        self.utterances = utterances
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        self.skips = SkipReport()
        self._unreported = SkipReport()  # skips not yet attached to a batch by `collate`

    @property
    def durations(self) -> list[float]:
        """Manifest durations in seconds, shape (N,), in dataset order."""
        return [u.duration for u in self.utterances]

    def __len__(self) -> int:
        return len(self.utterances)

    def _skip(self, reason: str, example: str) -> None:
        self.skips.add(reason, example)
        self._unreported.add(reason, example)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        u = self.utterances[index]
        try:
            wav = load_audio(u.audio, self.sample_rate)  # (S,) float32
        except AudioError:
            self._skip("unreadable audio" if os.path.isfile(u.audio) else "missing audio", u.audio)
            return None
        item: dict[str, Any] = {"id": u.id, "wav": torch.from_numpy(wav), "text": u.text}
        if self.tokenizer is not None:
            tokens = _token_tensor(self.tokenizer.encode(u.text), u.id)  # (U,)
            if tokens.numel() == 0:
                self._skip("empty tokens", u.id)
                return None
            item["tokens"] = tokens
        return item

    def collate(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        """:func:`collate_audio` plus ``batch["skips"]``: the skips of this process since its previous batch."""
        batch = collate_audio(items)
        if batch is not None:
            batch["skips"], self._unreported = self._unreported, SkipReport()
        return batch


def collate_audio(items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Pad a list of dataset items into a batch; None items are dropped, and all-None gives None.

    Returns ``{"ids": list[str], "texts": list[str], "wav": float32 (B, S_max) zero-padded,
    "wav_lengths": int64 (B,)}`` plus, when the items carry tokens, ``"tokens": int64 (B, U_max)`` padded with
    ``TOKEN_PAD`` (-1) and ``"token_lengths": int64 (B,)``.

    Example:
        >>> b = collate_audio([{"id": "a", "wav": torch.ones(3), "text": "x"}, None,
        ...                    {"id": "b", "wav": torch.ones(5), "text": "y"}])
        >>> b["wav"].shape, b["wav_lengths"].tolist()
        (torch.Size([2, 5]), [3, 5])
    """
    if not isinstance(items, Sequence):
        raise TypeError(f"items must be a sequence of dataset items, got {type(items).__name__}")
    good = [it for it in items if it is not None]
    if not good:
        return None
    for i, it in enumerate(good):
        if not isinstance(it, dict) or not {"id", "wav", "text"} <= it.keys():
            raise TypeError(
                f"each item must be a dict with 'id', 'wav' and 'text', got {it!r:.80} (item {i})"
            )
        if (
            not isinstance(it["wav"], torch.Tensor)
            or it["wav"].dim() != 1
            or not it["wav"].is_floating_point()
        ):
            raise TypeError(
                f"item {it['id']!r}: 'wav' must be a 1-D float tensor (S,), got {it['wav']!r:.80}"
            )
    with_tokens = ["tokens" in it for it in good]
    if any(with_tokens) and not all(with_tokens):
        raise ValueError("either all items or none must carry 'tokens'")
    wavs = [it["wav"].to(torch.float32) for it in good]
    batch: dict[str, Any] = {
        "ids": [it["id"] for it in good],
        "texts": [it["text"] for it in good],
        "wav": pad_sequence(wavs, batch_first=True, padding_value=0.0),  # (B, S_max)
        "wav_lengths": torch.tensor([w.shape[0] for w in wavs], dtype=torch.int64),  # (B,)
    }
    if all(with_tokens):
        toks = [it["tokens"].to(torch.int64) for it in good]
        batch["tokens"] = pad_sequence(toks, batch_first=True, padding_value=TOKEN_PAD)  # (B, U_max)
        batch["token_lengths"] = torch.tensor([t.shape[0] for t in toks], dtype=torch.int64)  # (B,)
    return batch
