"""FeatureConfig presets, overrides, (de)serialisation and validation."""

from __future__ import annotations

import numpy as np
import pytest

from ebranchformer.asr.feature_config import FLT_EPSILON, FeatureConfig


def test_espnet_preset_values():
    c = FeatureConfig.espnet()
    assert c == FeatureConfig()  # "espnet" is the default preset
    assert (c.n_fft, c.win_length, c.hop_length, c.n_mels) == (512, 400, 160, 80)
    assert (c.window, c.center, c.fmin, c.fmax, c.log_floor) == ("hann", True, 0.0, None, 1e-10)
    assert (c.preemphasis, c.remove_dc_offset, c.waveform_scale) == (0.0, False, 1.0)
    assert c.n_freq == 257 and c.min_num_samples == 257


def test_kaldi_preset_values():
    c = FeatureConfig.kaldi()
    assert c == FeatureConfig(preset="kaldi")
    assert (c.window, c.center, c.fmin, c.preemphasis, c.remove_dc_offset) == (
        "povey",
        False,
        20.0,
        0.97,
        True,
    )
    assert c.log_floor == float(np.finfo(np.float32).eps) == FLT_EPSILON
    assert c.min_num_samples == 400


def test_overrides_replace_preset_values():
    c = FeatureConfig.kaldi(n_mels=40, window="hamming", preemphasis=0.0)
    assert (c.n_mels, c.window, c.preemphasis, c.remove_dc_offset) == (40, "hamming", 0.0, True)
    assert FeatureConfig.espnet(center=False).min_num_samples == 512


@pytest.mark.parametrize("cfg", [FeatureConfig.espnet(), FeatureConfig.kaldi(n_mels=23, fmax=7000)])
def test_dict_yaml_round_trip(cfg):
    d = cfg.to_dict()
    assert d["window"] is not None  # resolved values are serialised, not the None placeholders
    assert FeatureConfig.from_dict(d) == cfg
    assert FeatureConfig.from_yaml(cfg.to_yaml()) == cfg


def test_unknown_key_raises():
    with pytest.raises(ValueError, match="unknown"):
        FeatureConfig.from_dict({"preset": "espnet", "n_mel": 80})


BAD_CONFIGS = {  # id: (fields, exception, text the message must contain)
    "unknown_preset": ({"preset": "htk"}, ValueError, "preset"),
    "kaldi_window_on_espnet": ({"window": "povey"}, ValueError, "window"),
    "win_longer_than_fft": ({"win_length": 600}, ValueError, "win_length"),
    "float_hop": ({"hop_length": 160.0}, TypeError, "hop_length"),
    "zero_mels": ({"n_mels": 0}, ValueError, "n_mels"),
    "fmax_above_nyquist": ({"preset": "kaldi", "fmax": 8001.0}, ValueError, "fmax"),
    "preemphasis_on_espnet": ({"preemphasis": 0.97}, ValueError, "preemphasis"),
    "kaldi_centered": ({"preset": "kaldi", "center": True}, ValueError, "center"),
    "zero_log_floor": ({"log_floor": 0.0}, ValueError, "log_floor"),
    "int_center": ({"center": 1}, TypeError, "center"),
    "negative_scale": ({"waveform_scale": -1.0}, ValueError, "waveform_scale"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_raises_naming_the_field(case):
    fields, exc, match = BAD_CONFIGS[case]
    with pytest.raises(exc, match=match):
        FeatureConfig(**fields)
