"""Coloured noise and SNR scaling for the synthetic corpus."""

import numpy as np
import pytest

from ebranchformer.asr.synth_noise import colored_noise, scale_to_snr


def _band_powers(x: np.ndarray) -> tuple[float, float]:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    return spectrum[1: spectrum.size // 8].mean(), spectrum[spectrum.size // 2:].mean()


def test_white_noise_is_flat_and_pink_noise_falls_with_frequency():
    rng = np.random.default_rng(0)
    white, pink = colored_noise(rng, 30001, "white"), colored_noise(rng, 30001, "pink")
    for noise in (white, pink):
        assert noise.shape == (30001,) and np.mean(noise**2) == pytest.approx(1.0)
    low, high = _band_powers(white)
    assert 0.8 < low / high < 1.25
    low, high = _band_powers(pink)
    assert low > 5 * high
    again = colored_noise(np.random.default_rng(0), 30001, "white")
    np.testing.assert_array_equal(again, white)


@pytest.mark.parametrize("snr_db", [-5.0, 10.0, 27.5])
def test_scaled_noise_sits_at_the_snr_even_when_longer_than_the_speech(snr_db):
    rng = np.random.default_rng(1)
    speech = 0.3 * np.sin(np.arange(8000) / 7.0)
    noise = scale_to_snr(3.0 * colored_noise(rng, 12000, "pink"), speech, snr_db)
    assert 10 * np.log10(np.mean(speech**2) / np.mean(noise**2)) == pytest.approx(snr_db, abs=1e-9)


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        colored_noise(rng, 100, "brown")
    with pytest.raises(ValueError, match="n must"):
        colored_noise(rng, 0, "white")
    with pytest.raises(ValueError, match="silent"):
        scale_to_snr(np.ones(10), np.zeros(10), 10.0)
    with pytest.raises(ValueError, match="1-D"):
        scale_to_snr(np.ones((2, 10)), np.ones(10), 10.0)
    with pytest.raises(ValueError, match="finite"):
        scale_to_snr(np.ones(10), np.ones(10), float("nan"))
