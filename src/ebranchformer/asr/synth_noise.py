"""Coloured noise for the synthetic corpus, and mixing it with speech at a given SNR.

Example:
    >>> import numpy as np
    >>> from ebranchformer.asr.synth_noise import colored_noise, scale_to_snr
    >>> speech = np.sin(np.arange(16000) / 5.0)
    >>> noise = scale_to_snr(colored_noise(np.random.default_rng(0), 16000, "pink"), speech, snr_db=20.0)
    >>> round(float(10 * np.log10(np.mean(speech**2) / np.mean(noise**2))), 6)
    20.0
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NOISE_TYPES", "colored_noise", "scale_to_snr"]

NOISE_TYPES = ("white", "pink")
"""The noise colours :func:`colored_noise` makes."""


def colored_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-power noise (n,) float64: ``"white"``, or ``"pink"`` (power falling as 1/f)."""
    if kind not in NOISE_TYPES:
        raise ValueError(f"kind must be one of {NOISE_TYPES}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if kind == "pink":
        size = 1 << max(n - 1, 1).bit_length()  # a power of two keeps the FFT fast
        spectrum = np.fft.rfft(rng.standard_normal(size))
        f = np.arange(spectrum.size, dtype=np.float64)
        f[0] = 1.0
        noise = np.fft.irfft(spectrum / np.sqrt(f), size)[:n]
    else:
        noise = rng.standard_normal(n)
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)


def scale_to_snr(noise: np.ndarray, speech: np.ndarray, snr_db: float) -> np.ndarray:
    """``noise`` scaled so that its mean power is ``snr_db`` below the mean power of ``speech``.

    The two may differ in length (noise that also covers silence around the speech, say).
    """
    speech, noise = np.asarray(speech, dtype=np.float64), np.asarray(noise, dtype=np.float64)
    if speech.ndim != 1 or noise.ndim != 1 or not speech.size or not noise.size:
        raise ValueError(f"speech and noise must be non-empty 1-D signals, got {speech.shape}, {noise.shape}")
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    power, noise_power = float(np.mean(speech**2)), float(np.mean(noise**2))
    if power <= 0.0 or noise_power <= 0.0:
        raise ValueError("speech and noise must not be silent")
    return noise * math.sqrt(power / noise_power / 10.0 ** (snr_db / 10.0))
