"""``FeatureConfig``: the options of :class:`~ebranchformer.asr.features.LogMelFeatures`, with two presets.

``"espnet"`` is ESPnet's ``DefaultFrontend`` (``Stft`` + ``LogMel``) at its recipe settings: a centred STFT
with reflect padding, a periodic Hann window of 400 samples zero-padded to n_fft 512, hop 160, power spectrum,
librosa's Slaney mel banks, ``log(max(x, 1e-10))``.

``"kaldi"`` is Kaldi's ``compute-fbank`` as kaldi-native-fbank computes it: 25 ms frames every 10 ms without
padding (``snip_edges=True``), DC removal, pre-emphasis 0.97, Povey window, FFT zero-padded to 512, power
spectrum, Kaldi mel banks from 20 Hz to Nyquist, ``log(max(x, FLT_EPSILON))``; dither is always 0. The samples
are used as given (kaldi-native-fbank does not rescale float input); to match Kaldi's ``compute-fbank`` on
16-bit audio read as floats in [-1, 1], set ``waveform_scale=32768``.

Fields left as None take the preset's value in ``__post_init__``, so ``to_dict`` always shows resolved values.

Example:
    >>> from ebranchformer.asr.feature_config import FeatureConfig
    >>> FeatureConfig.kaldi(n_mels=40).window
    'povey'
    >>> FeatureConfig.from_dict(FeatureConfig.espnet().to_dict()) == FeatureConfig.espnet()
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ebranchformer.config import ConfigBase, check

__all__ = ["FLT_EPSILON", "FeatureConfig"]

FLT_EPSILON = float(np.finfo(np.float32).eps)  # Kaldi's floor before the log of mel energies

_PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "espnet": {
        "window": "hann",
        "center": True,
        "fmin": 0.0,
        "log_floor": 1e-10,
        "preemphasis": 0.0,
        "remove_dc_offset": False,
    },
    "kaldi": {
        "window": "povey",
        "center": False,
        "fmin": 20.0,
        "log_floor": FLT_EPSILON,
        "preemphasis": 0.97,
        "remove_dc_offset": True,
    },
}
# ESPnet builds its window with torch.<name>_window (periodic); Kaldi uses its own symmetric windows.
_WINDOWS = {
    "espnet": ("hann", "hamming", "blackman"),
    "kaldi": ("povey", "hanning", "hamming", "rectangular"),
}


@dataclasses.dataclass(frozen=True)
class FeatureConfig(ConfigBase):
    """Log-mel feature options.

    Attributes:
        preset: "espnet" (ESPnet's DefaultFrontend) or "kaldi" (kaldi-native-fbank); decides the framing, the
            window family and the mel scale. Default "espnet".
        sample_rate: input sample rate in Hz. Default 16000.
        n_mels: number of mel bins (feature dim). Default 80.
        n_fft: FFT size (>= win_length; each frame is zero-padded to it). Default 512.
        win_length: window length in samples. Default 400 (25 ms at 16 kHz).
        hop_length: frame shift in samples. Default 160 (10 ms at 16 kHz).
        window: espnet: "hann" | "hamming" | "blackman" (torch's periodic windows, zero-padded to n_fft
            centred); kaldi: "povey" | "hanning" | "hamming" | "rectangular" (Kaldi's symmetric windows).
            Preset default: "hann" / "povey".
        center: espnet only: pad n_fft // 2 samples on both sides by reflection before framing (torch.stft's
            ``center=True``). Must be False for kaldi (``snip_edges=True``). Preset default: True / False.
        fmin: lowest mel-bank edge in Hz. Preset default: 0.0 / 20.0.
        fmax: highest mel-bank edge in Hz; None means sample_rate / 2. Default None.
        log_floor: mel energies are clamped to at least this before the log. Preset default: 1e-10 /
            FLT_EPSILON (1.19e-7).
        preemphasis: kaldi only: ``x[t] -= preemphasis * x[t-1]`` per frame (0 disables).
            Preset default: 0.0 / 0.97.
        remove_dc_offset: kaldi only: subtract each frame's mean first. Preset default: False / True.
        waveform_scale: the waveform is multiplied by this first. Default 1.0.
    """

    preset: str = "espnet"
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    window: str | None = None
    center: bool | None = None
    fmin: float | None = None
    fmax: float | None = None
    log_floor: float | None = None
    preemphasis: float | None = None
    remove_dc_offset: bool | None = None
    waveform_scale: float = 1.0

    @classmethod
    def espnet(cls, **overrides: Any) -> FeatureConfig:
        """ESPnet's DefaultFrontend settings (n_fft 512, win 400, hop 160, Hann, 80 Slaney mels)."""
        return cls(preset="espnet", **overrides)

    @classmethod
    def kaldi(cls, **overrides: Any) -> FeatureConfig:
        """kaldi-native-fbank's fbank settings (25 ms / 10 ms, Povey window, 80 Kaldi mels from 20 Hz)."""
        return cls(preset="kaldi", **overrides)

    def __post_init__(self) -> None:
        check(self.preset in _PRESET_DEFAULTS, f"preset must be 'espnet' or 'kaldi', got {self.preset!r}")
        for name, value in _PRESET_DEFAULTS[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("sample_rate", "n_mels", "n_fft", "win_length", "hop_length"):
            v = getattr(self, name)
            check(
                isinstance(v, int) and not isinstance(v, bool), f"{name} must be an int, got {v!r}", TypeError
            )
            check(v > 0, f"{name} must be > 0, got {v}")
        check(
            self.win_length <= self.n_fft,
            f"win_length must be <= n_fft={self.n_fft}, got win_length={self.win_length}",
        )
        check(
            self.window in _WINDOWS[self.preset],
            f"window must be one of {_WINDOWS[self.preset]} for preset {self.preset!r}, got {self.window!r}",
        )
        for name in ("center", "remove_dc_offset"):
            v = getattr(self, name)
            check(isinstance(v, bool), f"{name} must be a bool, got {v!r}", TypeError)
        for name in ("fmin", "log_floor", "preemphasis", "waveform_scale"):
            v = getattr(self, name)
            check(_is_real(v), f"{name} must be a finite number, got {v!r}", TypeError)
            object.__setattr__(self, name, float(v))
        nyquist = self.sample_rate / 2.0
        if self.fmax is not None:
            check(_is_real(self.fmax), f"fmax must be a number or None, got {self.fmax!r}", TypeError)
            object.__setattr__(self, "fmax", float(self.fmax))
        top = nyquist if self.fmax is None else self.fmax
        check(
            0.0 <= self.fmin < top <= nyquist,
            f"need 0 <= fmin < fmax <= {nyquist} Hz, got fmin={self.fmin}, fmax={self.fmax}",
        )
        check(self.log_floor > 0.0, f"log_floor must be > 0, got {self.log_floor}")
        check(0.0 <= self.preemphasis <= 1.0, f"preemphasis must be in [0, 1], got {self.preemphasis}")
        check(self.waveform_scale > 0.0, f"waveform_scale must be > 0, got {self.waveform_scale}")
        if self.preset == "espnet":
            check(
                self.preemphasis == 0.0,
                f"preemphasis is kaldi-only; the espnet preset needs 0.0, got {self.preemphasis}",
            )
            check(not self.remove_dc_offset, "remove_dc_offset is kaldi-only; the espnet preset needs False")
        else:
            check(
                not self.center, "center must be False for the kaldi preset (it frames with snip_edges=True)"
            )

    @property
    def n_freq(self) -> int:
        """Number of one-sided FFT bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    @property
    def min_num_samples(self) -> int:
        """Fewest samples an utterance may have: one full frame (kaldi, or espnet with ``center=False``:
        ``win_length`` resp. ``n_fft``), or ``n_fft // 2 + 1`` with ``center=True`` (reflect padding needs
        it)."""
        if self.preset == "kaldi":
            return self.win_length
        return self.n_fft // 2 + 1 if self.center else self.n_fft


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
