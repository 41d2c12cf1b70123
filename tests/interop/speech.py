"""Short test utterances at 16 kHz: espeak-ng speech when it is installed, else deterministic voiced sounds.

Shared by the interop and ONNX-runtime tests (not a test module itself).
"""

from __future__ import annotations

import functools

import numpy as np

from ebranchformer.asr.audio import resample

SENTENCES = ("seven red cats sleep", "a quick test of the model", "hello")


def _voiced(seconds: float, seed: int) -> np.ndarray:
    """A deterministic speech-like signal: a gliding harmonic tone with syllable-rate amplitude and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000.0
    f0 = 110.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / 16000.0
    tone = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + seed) ** 2
    return (0.1 * envelope * tone + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


@functools.cache
def utterances() -> tuple[np.ndarray, ...]:
    """Three float32 waveforms (S,) at 16 kHz of different lengths (read-only arrays)."""
    try:
        from ebranchformer.asr.espeak import SAMPLE_RATE, EspeakError, SpeechRequest, synthesize_batch

        try:
            pcms = synthesize_batch([SpeechRequest(s) for s in SENTENCES])
            wavs = [resample(p.astype(np.float32) / 32768.0, SAMPLE_RATE, 16000) for p in pcms]
        except EspeakError:
            raise ImportError from None
    except ImportError:
        wavs = [_voiced(s, i) for i, s in enumerate((1.6, 2.1, 0.7))]
    out = []
    for w in wavs:
        w = np.ascontiguousarray(w, dtype=np.float32)
        w.setflags(write=False)
        out.append(w)
    return tuple(out)
