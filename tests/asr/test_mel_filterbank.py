"""Mel filterbanks against librosa (committed fixture) and kaldi-native-fbank's own MelBanks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ebranchformer.asr.mel_filterbank import (
    hz_to_slaney_mel,
    kaldi_mel_filterbank,
    slaney_mel_filterbank,
    slaney_mel_to_hz,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "librosa_mel.npz")

# (fixture key, arguments); the fixture is written by tests/fixtures/make_mel_fixture.py with librosa.
LIBROSA_CASES = [
    ("sr16000_nfft512_nmels80_fmin0_fmaxnone", (16000, 512, 80, 0.0, None)),
    ("sr16000_nfft400_nmels40_fmin20_fmax7600", (16000, 400, 40, 20.0, 7600.0)),
    ("sr8000_nfft256_nmels23_fmin0_fmaxnone", (8000, 256, 23, 0.0, None)),
]


@pytest.mark.parametrize("key,args", LIBROSA_CASES, ids=[k for k, _ in LIBROSA_CASES])
def test_slaney_equals_librosa_fixture(key, args):
    with np.load(FIXTURE) as fx:
        ref = fx[key]
    ours = slaney_mel_filterbank(*args)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_slaney_default_arguments_are_espnet_frontend():
    with np.load(FIXTURE) as fx:
        np.testing.assert_allclose(slaney_mel_filterbank(), fx[LIBROSA_CASES[0][0]], rtol=0, atol=1e-6)


def test_slaney_scale_round_trip_and_knee():
    hz = np.array([0.0, 100.0, 999.0, 1000.0, 1001.0, 4000.0, 8000.0])
    np.testing.assert_allclose(slaney_mel_to_hz(hz_to_slaney_mel(hz)), hz, rtol=1e-12, atol=1e-9)
    assert hz_to_slaney_mel(1000.0) == pytest.approx(15.0)  # 1 kHz = 15 mels: 3 mels per 200 Hz below it
    assert hz_to_slaney_mel(6400.0) == pytest.approx(15.0 + 27.0)  # 27 mels per factor 6.4 above it


@pytest.mark.parametrize(
    "sr,n_fft,n_mels,fmin,fmax",
    [(16000, 512, 80, 20.0, None), (16000, 512, 40, 64.0, 7000.0), (8000, 256, 23, 20.0, None)],
)
def test_kaldi_banks_equal_kaldi_native_fbank(sr, n_fft, n_mels, fmin, fmax):
    knf = pytest.importorskip("kaldi_native_fbank")
    mel_opts = knf.MelBanksOptions()
    mel_opts.num_bins, mel_opts.low_freq, mel_opts.high_freq = n_mels, fmin, 0.0 if fmax is None else fmax
    frame_opts = knf.FrameExtractionOptions()
    frame_opts.samp_freq = sr
    frame_opts.frame_length_ms = 1000.0 * n_fft / sr  # window length n_fft: the FFT size is n_fft
    ref = np.array(knf.MelBanks(mel_opts, frame_opts, 1.0).get_matrix())  # (n_mels, n_fft // 2 + 1), float32
    ours = kaldi_mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    assert ours.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(ours[:, : ref.shape[1]], ref, rtol=0, atol=1e-4)
    assert np.all(ours[:, -1] == 0.0)  # Kaldi leaves the Nyquist bin out


def test_kaldi_banks_are_unit_peak_triangles_inside_the_band():
    banks = kaldi_mel_filterbank(16000, 512, 23, 20.0, None)
    freqs = np.arange(257) * 16000 / 512
    assert banks.max() <= 1.0 and banks.min() >= 0.0
    assert np.all(banks[:, freqs < 20.0] == 0.0)
    assert np.all(banks.max(axis=1) > 0.8)  # each triangle nearly reaches its peak of 1 on the FFT grid


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sample_rate": 0}, "sample_rate"),
        ({"n_fft": 256.0}, "n_fft"),
        ({"n_mels": -1}, "n_mels"),
        ({"fmin": 9000.0}, "fmin"),
        ({"fmax": 9000.0}, "fmax"),
    ],
)
@pytest.mark.parametrize("fn", [slaney_mel_filterbank, kaldi_mel_filterbank])
def test_bad_arguments_raise_naming_them(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
