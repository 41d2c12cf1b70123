"""Audio I/O through soundfile, resampling through soxr.

Example:
    >>> from ebranchformer.asr.audio import load_audio
    >>> wav = load_audio("utt.flac", sample_rate=16000)  # doctest: +SKIP
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["AudioError", "load_audio", "resample", "save_audio"]


class AudioError(ValueError):
    """A file could not be read as audio (missing, corrupt, or not audio)."""


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a mono float signal (T,) from ``orig_sr`` to ``target_sr`` with soxr (high quality)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got orig_sr={orig_sr}, target_sr={target_sr}")
    if orig_sr == target_sr:
        return wav
    import soxr

    return soxr.resample(wav, orig_sr, target_sr, quality="HQ").astype(wav.dtype, copy=False)


def load_audio(path: str | os.PathLike, sample_rate: int | None = 16000) -> np.ndarray:
    """Read ``path`` (wav/flac/ogg, anything libsndfile reads) as mono float32 in [-1, 1], shape (T,).

    Multi-channel audio is averaged to mono. With ``sample_rate`` set, the signal is resampled to it;
    with None the file's own rate is kept. Raises :class:`AudioError` naming the file when it cannot be read.
    """
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path!r}")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError for bad files
        raise AudioError(f"cannot read {path!r} as audio: {e}") from e
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]  # (T,)
    if wav.size == 0:
        raise AudioError(f"audio file {path!r} holds no samples")
    if sample_rate is not None:
        wav = resample(wav, sr, sample_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def save_audio(path: str | os.PathLike, wav: np.ndarray, sample_rate: int) -> None:
    """Write a mono float signal (T,) as 16-bit PCM (format from the extension: .wav, .flac, .ogg)."""
    import soundfile as sf

    sf.write(os.fspath(path), np.asarray(wav, dtype=np.float32), sample_rate, subtype=None)
