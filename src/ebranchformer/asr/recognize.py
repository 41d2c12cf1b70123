"""Batched recognition of audio files and manifests with a :class:`~ebranchformer.asr.ctc_model.CTCModel`.

What the ``ebranchformer transcribe`` / ``evaluate`` commands and the demo run:

* :func:`read_audio_files` -- read and check audio files (a clear :class:`~ebranchformer.asr.audio.AudioError`
  naming the file that is not audio, or too short for the model);
* :func:`log_probs_batched` -- CTC log-probabilities of many waveforms, longest first, ``batch_size`` at a time
  (the batching of :meth:`CTCModel.transcribe`, so greedy results are the same);
* :func:`decode_log_probs` -- greedy (``beam=1``), CTC prefix beam search (``beam>1``) or, with a
  :class:`~ebranchformer.asr.lexicon.Lexicon`, the lexicon-constrained beam search; text out;
* :func:`recognize_manifest` -- all of it over a JSONL manifest, with WER/CER (jiwer) against its texts;
* :func:`compare_precisions` -- the same manifest in float32 and in bf16: both results, the hypotheses that
  differ and how far the bf16 log-probabilities are from the float32 ones.

Example:
    >>> model = load_model("exp/model")  # doctest: +SKIP
    >>> texts = transcribe_files(model, ["a.wav", "b.wav"], beam=4)  # doctest: +SKIP
    >>> result = recognize_manifest(model, "data/test.jsonl")  # doctest: +SKIP
    >>> result.wer, result.cer  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ebranchformer.asr.audio import AudioError, load_audio
from ebranchformer.asr.ctc_model import CTCModel, padded_batches
from ebranchformer.asr.decoding import ctc_greedy, ctc_prefix_beam_search
from ebranchformer.asr.evaluate import error_rates
from ebranchformer.asr.lexicon import Lexicon, ctc_lexicon_beam_search
from ebranchformer.asr.manifest import read_jsonl_manifest

__all__ = [
    "PRECISIONS",
    "ManifestResult",
    "PrecisionComparison",
    "compare_precisions",
    "decode_log_probs",
    "log_probs_batched",
    "read_audio_files",
    "recognize_manifest",
    "transcribe_files",
]

PRECISIONS = ("fp32", "bf16")
"""Inference precisions: float32, or bfloat16 autocast."""


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def read_audio_files(model: CTCModel, paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Read ``paths`` at the model's sample rate: float32 (S,) each.

    Raises :class:`~ebranchformer.asr.audio.AudioError` (a ValueError) naming the first file that is missing,
    not audio, or shorter than the model can encode.
    """
    if model.frontend is None:
        raise ValueError("this model has no waveform frontend (config.features is None)")
    rate = model.config.features.sample_rate
    needed = model.min_num_samples()
    wavs = []
    for p in paths:
        wav = load_audio(p, rate)
        if wav.shape[0] < needed:
            raise AudioError(
                f"audio file {os.fspath(p)!r} is too short: {wav.shape[0]} samples at {rate} Hz, "
                f"the model needs at least {needed}"
            )
        wavs.append(wav)
    return wavs


@torch.no_grad()
def log_probs_batched(
    model: CTCModel, wavs: Sequence[np.ndarray], batch_size: int = 16, precision: str = "fp32"
) -> list[torch.Tensor]:
    """CTC log-probabilities (T'_i, V) float32 on the CPU of each waveform (S_i,), in input order.

    Waveforms are sorted longest first and run ``batch_size`` at a time on the model's device, as
    :meth:`CTCModel.transcribe` does. The model is put in eval mode (and restored). ``precision="bf16"`` runs
    the model under bfloat16 autocast (softmax and LayerNorm statistics stay float32).
    """
    _check_int("batch_size", batch_size, 1)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    autocast = (
        torch.autocast(model.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    out: list[torch.Tensor | None] = [None] * len(wavs)
    was_training = model.training
    model.eval()
    try:
        for idx, batch, lengths in padded_batches(wavs, batch_size):
            with autocast:
                lp, lp_lengths = model.log_probs(batch.to(model.device), lengths.to(model.device))  # (b, T', V)
            lp, lp_lengths = lp.float().cpu(), lp_lengths.cpu()
            for row, i in enumerate(idx):
                out[i] = lp[row, : int(lp_lengths[row])]
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def decode_log_probs(
    model: CTCModel,
    log_probs: Sequence[torch.Tensor],
    beam: int = 1,
    lexicon: Lexicon | None = None,
) -> list[str]:
    """Texts of per-utterance log-probabilities (T'_i, V).

    Args:
        model: the model (its tokenizer turns ids into text).
        log_probs: from :func:`log_probs_batched`.
        beam: without a lexicon, 1: greedy, > 1: CTC prefix beam search with that beam; with a lexicon, the
            beam of the lexicon search.
        lexicon: decode with :func:`~ebranchformer.asr.lexicon.ctc_lexicon_beam_search`: only sequences of
            the lexicon's words come out.
    """
    _check_int("beam", beam, 1)
    if model.tokenizer is None:
        raise ValueError("decoding needs a model with a tokenizer")
    tok = model.tokenizer
    if lexicon is not None:
        if not isinstance(lexicon, Lexicon):
            raise TypeError(f"lexicon must be a Lexicon or None, got {type(lexicon).__name__}")
        return [" ".join(ctc_lexicon_beam_search(lp, lexicon, beam=beam)) for lp in log_probs]
    texts = []
    for lp in log_probs:
        ids = ctc_greedy(lp)[0] if beam == 1 else ctc_prefix_beam_search(lp, beam=beam)[0]
        texts.append(tok.transcript(ids))
    return texts


def transcribe_files(
    model: CTCModel,
    paths: Sequence[str | os.PathLike],
    beam: int = 1,
    batch_size: int = 16,
    lexicon: Lexicon | None = None,
    precision: str = "fp32",
) -> list[str]:
    """Transcripts of audio files (see :func:`read_audio_files` for the errors)."""
    wavs = read_audio_files(model, paths)
    return decode_log_probs(model, log_probs_batched(model, wavs, batch_size, precision), beam, lexicon)


@dataclasses.dataclass
class ManifestResult:
    """:func:`recognize_manifest`'s result: ``ids``, ``refs``, ``hyps`` (per utterance), corpus ``wer``,
    ``cer`` (fractions; NaN without references) and ``skipped`` (manifest lines left out, as text)."""

    ids: list[str]
    audio: list[str]
    refs: list[str]
    hyps: list[str]
    wer: float
    cer: float
    skipped: str

    def to_dict(self) -> dict[str, object]:
        return {"wer": self.wer, "cer": self.cer, "utterances": len(self.ids), "skipped": self.skipped}


def _read_manifest(manifest: str | os.PathLike):
    utts, skips = read_jsonl_manifest(Path(manifest))
    if not utts:
        raise ValueError(f"manifest {os.fspath(manifest)!r} holds no usable utterances ({skips})")
    return utts, skips


def recognize_manifest(
    model: CTCModel,
    manifest: str | os.PathLike,
    beam: int = 1,
    batch_size: int = 16,
    lexicon: Lexicon | None = None,
    log_probs: Sequence[torch.Tensor] | None = None,
    precision: str = "fp32",
) -> ManifestResult:
    """Transcribe a JSONL manifest and score it against its texts (jiwer corpus WER/CER).

    ``log_probs`` (from an earlier call's :func:`log_probs_batched` on the same manifest) skips the forward.
    Raises ValueError when the manifest holds no usable utterance.
    """
    utts, skips = _read_manifest(manifest)
    if log_probs is None:
        wavs = read_audio_files(model, [u.audio for u in utts])
        log_probs = log_probs_batched(model, wavs, batch_size, precision)
    return _score(model, utts, skips, log_probs, beam, lexicon)


def _score(model: CTCModel, utts, skips, log_probs, beam: int, lexicon: Lexicon | None) -> ManifestResult:
    """Decode the manifest's ``log_probs`` and score the texts against its utterances ``utts``."""
    hyps = decode_log_probs(model, log_probs, beam, lexicon)
    refs = [u.text for u in utts]
    wer, cer = error_rates(refs, hyps)
    return ManifestResult([u.id for u in utts], [u.audio for u in utts], refs, hyps, wer, cer,
                          str(skips) if skips else "")


@dataclasses.dataclass
class PrecisionComparison:
    """:func:`compare_precisions`'s result: the two :class:`ManifestResult`, the ids whose hypotheses differ,
    the frames (over all utterances) whose most likely token differs, and the max / mean absolute difference of
    the bf16 log-probabilities from the float32 ones."""

    fp32: ManifestResult
    bf16: ManifestResult
    differ: list[str]
    frames: int
    frames_differ: int
    log_prob_max_abs: float
    log_prob_mean_abs: float

    def to_dict(self) -> dict[str, object]:
        return {"fp32": self.fp32.to_dict(), "bf16": self.bf16.to_dict(), "hyps_differ": len(self.differ),
                "differ_ids": self.differ, "frames": self.frames, "frames_differ": self.frames_differ,
                "log_prob_max_abs": self.log_prob_max_abs, "log_prob_mean_abs": self.log_prob_mean_abs}


def compare_precisions(
    model: CTCModel,
    manifest: str | os.PathLike,
    beam: int = 1,
    batch_size: int = 16,
    lexicon: Lexicon | None = None,
) -> PrecisionComparison:
    """Decode a JSONL manifest in float32 and under bf16 autocast (manifest and audio read once) and compare: does
    bf16 change the WER on this data? Raises what :func:`recognize_manifest` raises."""
    utts, skips = _read_manifest(manifest)
    wavs = read_audio_files(model, [u.audio for u in utts])
    lps = {p: log_probs_batched(model, wavs, batch_size, p) for p in PRECISIONS}  # (T'_i, V) each
    res = {p: _score(model, utts, skips, lps[p], beam, lexicon) for p in PRECISIONS}
    a, b = torch.cat(lps["fp32"]), torch.cat(lps["bf16"])  # (sum T'_i, V)
    diff = (a - b).abs()
    return PrecisionComparison(
        res["fp32"], res["bf16"],
        differ=[i for i, x, y in zip(res["fp32"].ids, res["fp32"].hyps, res["bf16"].hyps) if x != y],
        frames=a.shape[0], frames_differ=int((a.argmax(-1) != b.argmax(-1)).sum()),
        log_prob_max_abs=float(diff.max()) if diff.numel() else 0.0,
        log_prob_mean_abs=float(diff.mean()) if diff.numel() else 0.0,
    )  # fmt: skip
