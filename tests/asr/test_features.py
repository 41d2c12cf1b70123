"""LogMelFeatures: the espnet preset against ESPnet's Stft + LogMel, the kaldi preset against
kaldi-native-fbank."""

from __future__ import annotations

import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.features import FeatureConfig, LogMelFeatures

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "librosa_mel.npz")
LIBROSA_KEY = "sr16000_nfft512_nmels80_fmin0_fmaxnone"


def _librosa_stand_in() -> types.ModuleType:
    """A ``librosa`` whose ``filters.mel`` serves librosa's real matrix for (16000, 512, 80) and nothing
    else."""
    with np.load(FIXTURE) as fx:
        matrix = fx[LIBROSA_KEY].astype(np.float32)

    def mel(*, sr, n_fft, n_mels, fmin=0.0, fmax=None, htk=False, **rest):
        if (sr, n_fft, n_mels, fmin, fmax, htk, rest) != (16000, 512, 80, 0, 8000.0, False, {}):
            raise NotImplementedError(
                f"the librosa stand-in only has the (16000, 512, 80) matrix, asked {locals()}"
            )
        return matrix.copy()

    librosa = types.ModuleType("librosa")
    librosa.filters = types.ModuleType("librosa.filters")
    librosa.filters.mel = mel
    return librosa


def _torch_complex_stand_in() -> dict[str, types.ModuleType]:
    """Enough of torch_complex for espnet2.layers.stft to import (its forward does not use it)."""
    root, tensor, functional = (
        types.ModuleType(n) for n in ("torch_complex", "torch_complex.tensor", "torch_complex.functional")
    )
    tensor.ComplexTensor = type("ComplexTensor", (), {})
    root.tensor, root.functional = tensor, functional
    return {"torch_complex": root, "torch_complex.tensor": tensor, "torch_complex.functional": functional}


@pytest.fixture
def espnet_layers():
    """(Stft, LogMel) from ESPnet, imported against the stand-ins; sys.modules is restored afterwards."""
    stubs = {"librosa": _librosa_stand_in()}
    stubs["librosa.filters"] = stubs["librosa"].filters
    try:
        import torch_complex.tensor  # noqa: F401  (use the real package when it is installed)
    except ImportError:
        stubs.update(_torch_complex_stand_in())
    fresh = ["espnet2.layers.stft", "espnet2.layers.log_mel", "espnet2.enh.layers.complex_utils"]
    saved = {name: sys.modules.get(name) for name in [*stubs, *fresh]}
    for name in fresh:
        sys.modules.pop(name, None)
    sys.modules.update(stubs)
    try:
        from espnet2.layers.log_mel import LogMel
        from espnet2.layers.stft import Stft

        yield Stft, LogMel
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _padded_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wav = torch.zeros(len(lengths), max(lengths))  # (B, S)
    for b, n in enumerate(lengths):
        wav[b, :n] = 0.1 * torch.randn(n, generator=g)
    return wav, torch.tensor(lengths)


@pytest.mark.parity
@pytest.mark.parametrize("window", ["hann", "hamming", "blackman"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_espnet_preset_equals_espnet_stft_logmel(espnet_layers, window, center, seed):
    Stft, LogMel = espnet_layers
    lengths = torch.randint(512, 12000, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
    wav, lens = _padded_batch(lengths, seed)
    stft = Stft(n_fft=512, win_length=400, hop_length=160, window=window, center=center)
    spec, ref_lens = stft(wav.clone(), lens)  # (B, T, 257, 2)
    ref, _ = LogMel(fs=16000, n_fft=512, n_mels=80)(spec[..., 0] ** 2 + spec[..., 1] ** 2, ref_lens)

    feats, feat_lens = LogMelFeatures(FeatureConfig.espnet(window=window, center=center))(wav, lens)
    assert feat_lens.dtype == torch.int64 and feat_lens.tolist() == ref_lens.tolist()
    assert feats.shape == ref.shape
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-4)


@pytest.mark.parity
def test_espnet_preset_is_the_default_frontend_configuration(espnet_layers):
    """The preset's defaults are ESPnet recipes' frontend_conf (n_fft 512, win 400, hop 160) and LogMel's."""
    Stft, LogMel = espnet_layers
    wav, lens = _padded_batch([16000, 3200, 4000], seed=3)
    spec, ref_lens = Stft(n_fft=512, win_length=400, hop_length=160)(wav.clone(), lens)
    ref, _ = LogMel()(spec[..., 0] ** 2 + spec[..., 1] ** 2, ref_lens)
    feats, feat_lens = LogMelFeatures()(wav, lens)
    assert feat_lens.tolist() == ref_lens.tolist() == [101, 21, 26]
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-4)


def _knf_fbank(x: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    fo = opts.frame_opts
    fo.samp_freq = float(cfg.sample_rate)
    fo.frame_length_ms = 1000.0 * cfg.win_length / cfg.sample_rate
    fo.frame_shift_ms = 1000.0 * cfg.hop_length / cfg.sample_rate
    fo.dither, fo.snip_edges, fo.window_type = 0.0, True, cfg.window
    fo.preemph_coeff, fo.remove_dc_offset, fo.round_to_power_of_two = (
        cfg.preemphasis,
        cfg.remove_dc_offset,
        True,
    )
    opts.mel_opts.num_bins, opts.mel_opts.low_freq = cfg.n_mels, cfg.fmin
    opts.mel_opts.high_freq = 0.0 if cfg.fmax is None else cfg.fmax
    opts.use_energy, opts.use_power, opts.use_log_fbank = False, True, True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(float(cfg.sample_rate), x.astype(np.float32).tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])  # (T, n_mels)


def _tones_and_noise(n: int, sr: int, seed: int) -> np.ndarray:
    """A real-ish signal: three tones with a slow amplitude envelope, plus noise and a DC offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t)
    tones = sum(
        a * np.sin(2 * np.pi * f * t + p)
        for a, f, p in [(0.3, 220.0, 0.1), (0.2, 1250.0, 1.0), (0.05, 3100.0, 2.0)]
    )
    return (env * tones + 0.02 * rng.standard_normal(n) + 0.01).astype(np.float32)


KALDI_SIGNALS = {
    "tones_noise": lambda: _tones_and_noise(16000, 16000, 0),
    "white_noise": lambda: (0.05 * np.random.default_rng(1).standard_normal(12345)).astype(np.float32),
    "one_frame": lambda: _tones_and_noise(400, 16000, 2),
    "quiet_noise": lambda: (1e-4 * np.random.default_rng(3).standard_normal(4000)).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(KALDI_SIGNALS))
def test_kaldi_preset_matches_kaldi_native_fbank(name):
    x = KALDI_SIGNALS[name]()
    cfg = FeatureConfig.kaldi()
    ref = _knf_fbank(x, cfg)
    feats, lens = LogMelFeatures(cfg)(torch.from_numpy(x)[None])
    assert lens.tolist() == [ref.shape[0]] and feats.shape == (1, ref.shape[0], 80)
    np.testing.assert_allclose(feats[0].numpy(), ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [
        {"window": "hamming"},
        {"window": "hanning", "preemphasis": 0.0},
        {"window": "rectangular", "remove_dc_offset": False},
        {"n_mels": 40, "fmin": 64.0, "fmax": 7000.0},
        {"sample_rate": 8000, "win_length": 200, "hop_length": 80, "n_fft": 256, "n_mels": 23},
    ],
    ids=["hamming", "hanning_no_preemph", "rectangular_keep_dc", "40_mels_band", "8khz"],
)
def test_kaldi_preset_options_match_kaldi_native_fbank(overrides):
    cfg = FeatureConfig.kaldi(**overrides)
    x = _tones_and_noise(cfg.sample_rate, cfg.sample_rate, 4)
    feats, _ = LogMelFeatures(cfg)(torch.from_numpy(x)[None])
    np.testing.assert_allclose(feats[0].numpy(), _knf_fbank(x, cfg), rtol=0, atol=1e-3)


def test_kaldi_waveform_scale_matches_kaldi_on_scaled_samples():
    """waveform_scale=32768 reproduces Kaldi's numbers for 16-bit audio read as floats in [-1, 1]."""
    x = _tones_and_noise(8000, 16000, 5)
    feats, _ = LogMelFeatures(FeatureConfig.kaldi(waveform_scale=32768.0))(torch.from_numpy(x)[None])
    np.testing.assert_allclose(
        feats[0].numpy(), _knf_fbank(x * 32768.0, FeatureConfig.kaldi()), rtol=0, atol=1e-3
    )


def test_kaldi_batch_rows_equal_each_row_alone():
    lengths = [16000, 7001, 400, 12345]
    rows = [_tones_and_noise(n, 16000, 10 + i) for i, n in enumerate(lengths)]
    wav = torch.zeros(len(rows), max(lengths))  # (B, S)
    for b, r in enumerate(rows):
        wav[b, : len(r)] = torch.from_numpy(r)
    cfg = FeatureConfig.kaldi()
    feats, lens = LogMelFeatures(cfg)(wav, torch.tensor(lengths))
    for b, r in enumerate(rows):
        ref = _knf_fbank(r, cfg)
        assert int(lens[b]) == ref.shape[0]
        np.testing.assert_allclose(feats[b, : ref.shape[0]].numpy(), ref, rtol=0, atol=1e-3)
        assert torch.all(feats[b, ref.shape[0] :] == 0.0)


@pytest.mark.parametrize("preset", ["espnet", "kaldi"])
def test_padding_values_do_not_matter(preset):
    wav, lens = _padded_batch([9000, 5000, 700], seed=7)
    garbage = wav.clone()
    garbage[1, 5000:] = 3.0
    garbage[2, 700:] = -1.0
    fe = LogMelFeatures(FeatureConfig(preset=preset))
    a, la = fe(wav, lens)
    b, lb = fe(garbage, lens)
    assert torch.equal(a, b) and torch.equal(la, lb)


@settings(max_examples=20, deadline=None)
@given(
    preset=st.sampled_from(["espnet", "kaldi"]),
    center=st.booleans(),
    lengths=st.lists(st.integers(min_value=512, max_value=4000), min_size=1, max_size=3),
    hop=st.sampled_from([80, 128, 160]),
)
def test_num_frames_matches_output_and_formula(preset, center, lengths, hop):
    cfg = FeatureConfig(preset=preset, hop_length=hop, center=center and preset == "espnet")
    fe = LogMelFeatures(cfg)
    wav = torch.randn(len(lengths), max(lengths)) * 0.1
    feats, lens = fe(wav, torch.tensor(lengths))
    for n, got in zip(lengths, lens.tolist()):
        if preset == "kaldi":
            expected = 1 + (n - 400) // hop  # snip_edges: only whole frames
        elif cfg.center:
            expected = 1 + n // hop  # padded by n_fft // 2 on each side
        else:
            expected = 1 + (n - 512) // hop
        assert got == expected == fe.num_frames(n)
    assert feats.shape[1] == fe.num_frames(max(lengths))
    assert torch.equal(fe.num_frames(torch.tensor(lengths)), lens)
    valid = torch.arange(feats.shape[1])[None, :] < lens[:, None]  # (B, T)
    assert torch.all(feats[~valid] == 0.0)


def test_num_frames_too_short_is_zero():
    assert LogMelFeatures(FeatureConfig.kaldi()).num_frames(399) == 0
    assert LogMelFeatures(FeatureConfig.espnet(center=False)).num_frames(100) == 0


def test_log_floor_applies_to_silence():
    for cfg in (FeatureConfig.espnet(), FeatureConfig.kaldi()):
        feats, _ = LogMelFeatures(cfg)(torch.zeros(1, 1600))
        torch.testing.assert_close(feats, torch.full_like(feats, math.log(cfg.log_floor)))


def test_float64_and_float16_input():
    wav, lens = _padded_batch([3000, 2000], seed=9)
    fe = LogMelFeatures()
    ref, _ = fe(wav, lens)
    f64, _ = fe(wav.double(), lens)
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), ref, rtol=0, atol=1e-3)
    f16, _ = fe(wav.half(), lens)
    assert f16.dtype == torch.float32  # half input is computed in float32


def test_mel_matrix_not_in_state_dict():
    assert LogMelFeatures().state_dict() == {}


# --- bad input: one test each ---


def test_bad_config_type():
    with pytest.raises(TypeError, match="config"):
        LogMelFeatures({"preset": "espnet"})


def test_non_tensor_wav():
    with pytest.raises(TypeError, match="wav"):
        LogMelFeatures()(np.zeros((1, 1600), dtype=np.float32))


def test_integer_wav():
    with pytest.raises(TypeError, match="wav"):
        LogMelFeatures()(torch.zeros(1, 1600, dtype=torch.int16))


def test_one_dimensional_wav():
    with pytest.raises(ValueError, match=r"wav must have shape \(B, S\)"):
        LogMelFeatures()(torch.zeros(1600))


def test_empty_batch():
    with pytest.raises(ValueError, match="wav must hold at least one utterance, got batch size 0"):
        LogMelFeatures()(torch.zeros(0, 1600))


def test_wav_shorter_than_one_frame():
    with pytest.raises(ValueError, match="wav has 399 samples"):
        LogMelFeatures(FeatureConfig.kaldi())(torch.zeros(1, 399))


def test_float_wav_lengths():
    with pytest.raises(TypeError, match="wav_lengths"):
        LogMelFeatures()(torch.zeros(2, 1600), torch.tensor([1600.0, 800.0]))


def test_wav_lengths_wrong_shape():
    with pytest.raises(ValueError, match="wav_lengths"):
        LogMelFeatures()(torch.zeros(2, 1600), torch.tensor([1600]))


def test_wav_lengths_beyond_wav():
    with pytest.raises(ValueError, match="wav_lengths"):
        LogMelFeatures()(torch.zeros(2, 1600), torch.tensor([1600, 1601]))


def test_row_shorter_than_one_frame():
    with pytest.raises(ValueError, match="wav_lengths"):
        LogMelFeatures(FeatureConfig.kaldi())(torch.zeros(2, 1600), torch.tensor([1600, 300]))
