"""The data side of training: tokenizer building, normalization statistics, batch loaders, epoch streams.

* :func:`build_tokenizer` -- a char or sentencepiece tokenizer from the training transcripts (or an existing
  tokenizer directory), saved atomically into ``<output_dir>/tokenizer``.
* :func:`compute_feature_stats` -- ESPnet's ``collect_stats``: sums of the log-mel features over the training
  set, as a :class:`~ebranchformer.asr.global_mvn.GlobalMVN`.
* :class:`MinLengthCollate` -- ``AudioDataset.collate`` that also drops (and counts as ``"too short"``) items
  with fewer samples than the model can encode.
* :func:`make_loader` -- a DataLoader over a list of index batches with its own ``torch.Generator`` so that
  creating it never draws from torch's global generator (needed for exact resumes).
* :func:`frames_of` -- manifest durations as feature-frame counts, the batch sampler's length unit.

Example:
    >>> frames_of([1.0, 2.5], sample_rate=16000, hop_length=160)
    [100.0, 250.0]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ebranchformer.asr.atomic import atomic_directory, atomic_write
from ebranchformer.asr.batching import BucketBatchSampler
from ebranchformer.asr.data import AudioDataset
from ebranchformer.asr.features import LogMelFeatures
from ebranchformer.asr.global_mvn import GlobalMVN, compute_stats
from ebranchformer.asr.manifest import Utterance
from ebranchformer.asr.skip_report import SkipReport
from ebranchformer.asr.tokenizer import CharTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from ebranchformer.asr.train_config import TokenizerConfig

__all__ = [
    "MinLengthCollate",
    "build_tokenizer",
    "compute_feature_stats",
    "frames_of",
    "make_loader",
    "save_stats_atomic",
]


def frames_of(durations: Sequence[float], sample_rate: int, hop_length: int) -> list[float]:
    """Durations in seconds -> feature frames (``duration * sample_rate / hop_length``)."""
    return [float(d) * sample_rate / hop_length for d in durations]


def build_tokenizer(config: TokenizerConfig, texts: Sequence[str], directory: str | os.PathLike) -> Tokenizer:
    """Build the tokenizer ``config`` asks for and save it into ``directory`` (atomically); returns it.

    ``config.dir`` set: that tokenizer is loaded and copied. Else "char": :meth:`CharTokenizer.train` on
    ``texts``; "bpe": :meth:`SentencePieceTokenizer.train` with ``config.vocab_size`` (deterministic).
    """
    if config.dir is not None:
        tok = load_tokenizer(config.dir)
        with atomic_directory(directory) as tmp:
            tok.save(tmp)
        return tok
    if not texts:
        raise ValueError("no training transcripts to build the tokenizer from")
    with atomic_directory(directory) as tmp:
        if config.kind == "char":
            tok = CharTokenizer.train(texts)
            tok.save(tmp)
        else:
            tok = SentencePieceTokenizer.train(texts, tmp, config.vocab_size, model_type=config.model_type)
    return tok


class MinLengthCollate:
    """Collate function: ``dataset.collate`` after dropping items shorter than ``min_samples``.

    Dropped items are counted as ``"too short"`` in ``batch["skips"]`` (of this batch, or of the next one
    when the whole batch was dropped). Picklable, for DataLoader workers.
    """

    def __init__(self, dataset: AudioDataset, min_samples: int) -> None:
        self.dataset = dataset
        self.min_samples = int(min_samples)
        self._pending = SkipReport()

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        kept = []
        for it in items:
            if it is not None and it["wav"].shape[0] < self.min_samples:
                self._pending.add("too short", it["id"])
                it = None
            kept.append(it)
        batch = self.dataset.collate(kept)
        if batch is not None:
            batch["skips"] = batch["skips"].merge(self._pending)
            self._pending = SkipReport()
        return batch


def make_loader(
    dataset: AudioDataset,
    batches: list[list[int]],
    collate: MinLengthCollate,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``collate`` d ``batches`` (lists of dataset indices) in order.

    It carries its own generator, so iterating it leaves torch's global random state untouched.
    """
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def compute_feature_stats(
    utterances: Sequence[Utterance],
    frontend: LogMelFeatures,
    *,
    sample_rate: int,
    max_frames: float,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> GlobalMVN:
    """Feature statistics (count, sum, sum of squares) over ``utterances`` (unreadable ones left out)."""
    dataset = AudioDataset(utterances, tokenizer=None, sample_rate=sample_rate)
    hop = frontend.config.hop_length
    sampler = BucketBatchSampler(frames_of(dataset.durations, sample_rate, hop), max_frames, shuffle=False)
    collate = MinLengthCollate(dataset, frontend.config.min_num_samples)
    frontend = frontend.to(device)

    def rows():
        for batch in make_loader(dataset, sampler.batches(0), collate, num_workers):
            if batch is None:
                continue
            feats, lengths = frontend(batch["wav"].to(device), batch["wav_lengths"].to(device))  # (B, T, F)
            for b in range(feats.shape[0]):
                yield feats[b, : int(lengths[b])].double().cpu()  # (T_b, F)

    try:
        return compute_stats(rows())
    except ValueError as e:
        raise ValueError(f"cannot compute feature statistics: no readable training audio ({e})") from e


def save_stats_atomic(mvn: GlobalMVN, path: str | os.PathLike) -> Path:
    """Write ``mvn``'s statistics (ESPnet ``feats_stats.npz`` layout) to ``path`` atomically."""
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        scratch = Path(tmp) / path.name
        mvn.save_stats(scratch)
        return atomic_write(path, scratch.read_bytes())
