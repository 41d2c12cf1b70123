"""Mel filterbank matrices: librosa's Slaney banks (ESPnet's frontend) and Kaldi's banks (kaldi-native-fbank).

Both return a numpy matrix (n_mels, n_fft // 2 + 1) that maps a one-sided power spectrum to mel energies:
``mel = power @ banks.T``.

Example:
    >>> from ebranchformer.asr.mel_filterbank import slaney_mel_filterbank, kaldi_mel_filterbank
    >>> slaney_mel_filterbank(16000, 512, 80).shape
    (80, 257)
    >>> kaldi_mel_filterbank(16000, 512, 80).shape
    (80, 257)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["hz_to_slaney_mel", "kaldi_mel_filterbank", "slaney_mel_filterbank", "slaney_mel_to_hz"]

# Slaney's Auditory Toolbox scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15.0
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_slaney_mel(hz: np.ndarray | float) -> np.ndarray:
    """Frequencies in Hz to Slaney mels (librosa's ``hz_to_mel`` with ``htk=False``); float64 array."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, linear)


def slaney_mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Slaney mels to Hz, the inverse of :func:`hz_to_slaney_mel`; float64 array."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = _F_SP * mel
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, linear)


def _check_bank_args(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> float:
    """Validate the shared arguments; return the resolved upper edge (Nyquist when ``fmax`` is None)."""
    for name, v in (("sample_rate", sample_rate), ("n_fft", n_fft), ("n_mels", n_mels)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    nyquist = sample_rate / 2.0
    top = nyquist if fmax is None else float(fmax)
    if not 0.0 <= float(fmin) < top:
        raise ValueError(f"fmin must satisfy 0 <= fmin < fmax ({top} Hz), got fmin={fmin!r}")
    if top > nyquist:
        raise ValueError(f"fmax must be <= sample_rate / 2 = {nyquist} Hz (or None), got {fmax!r}")
    return top


def slaney_mel_filterbank(
    sample_rate: int = 16000, n_fft: int = 512, n_mels: int = 80, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """librosa's default mel matrix (``librosa.filters.mel``, htk=False, norm="slaney"), float32.

    Triangles on the Slaney mel scale with corners at ``n_mels + 2`` points evenly spaced in mel between
    ``fmin`` and ``fmax`` (default ``sample_rate / 2``), each scaled by ``2 / (upper_hz - lower_hz)`` so that
    every filter has unit area. The arithmetic follows librosa's, including its rounding to float32 before
    the area normalisation, so the matrix agrees with librosa's to float32 rounding.

    Returns:
        np.ndarray float32 (n_mels, n_fft // 2 + 1).
    """
    top = _check_bank_args(sample_rate, n_fft, n_mels, fmin, fmax)
    fft_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)  # (n_freq,)
    mel_pts = np.linspace(hz_to_slaney_mel(fmin), hz_to_slaney_mel(top), n_mels + 2)  # (n_mels + 2,)
    corners_hz = slaney_mel_to_hz(mel_pts)  # (n_mels + 2,)
    widths = np.diff(corners_hz)  # (n_mels + 1,)
    dist = corners_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_freq)
    rising = -dist[:-2] / widths[:-1, None]  # (n_mels, n_freq)
    falling = dist[2:] / widths[1:, None]  # (n_mels, n_freq)
    banks = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)  # (n_mels, n_freq)
    area_norm = 2.0 / (corners_hz[2:] - corners_hz[:-2])  # (n_mels,)
    return (banks * area_norm[:, None]).astype(np.float32)


def _kaldi_mel(hz: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def kaldi_mel_filterbank(
    sample_rate: int = 16000,
    n_fft: int = 512,
    n_mels: int = 80,
    fmin: float = 20.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Kaldi's fbank mel matrix (``MelBanks`` without VTLN), float64.

    Triangles of peak 1 (no area normalisation) on Kaldi's mel scale ``1127 ln(1 + f / 700)``, with corners at
    ``n_mels + 2`` points evenly spaced in mel between ``fmin`` (Kaldi's low_freq, default 20 Hz) and ``fmax``
    (high_freq; None means Nyquist, Kaldi's ``high_freq=0``). As in Kaldi only the FFT bins
    ``0 .. n_fft // 2 - 1`` get weights: the Nyquist bin's column is zero.

    Returns:
        np.ndarray float64 (n_mels, n_fft // 2 + 1).
    """
    top = _check_bank_args(sample_rate, n_fft, n_mels, fmin, fmax)
    lo, hi = _kaldi_mel(fmin), _kaldi_mel(top)
    step = (hi - lo) / (n_mels + 1)
    left = lo + step * np.arange(n_mels)  # (n_mels,)
    center, right = left + step, left + 2 * step  # (n_mels,)
    bin_mel = _kaldi_mel(np.arange(n_fft // 2) * (sample_rate / n_fft))  # (n_fft // 2,)
    up = (bin_mel[None, :] - left[:, None]) / (center - left)[:, None]  # (n_mels, n_fft // 2)
    down = (right[:, None] - bin_mel[None, :]) / (right - center)[:, None]  # (n_mels, n_fft // 2)
    inside = (bin_mel[None, :] > left[:, None]) & (bin_mel[None, :] < right[:, None])
    weights = np.where(inside, np.where(bin_mel[None, :] <= center[:, None], up, down), 0.0)
    banks = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float64)  # (n_mels, n_freq)
    banks[:, : n_fft // 2] = weights
    return banks
