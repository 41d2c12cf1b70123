"""Log-mel filterbank features in torch, batched, on CPU or GPU: ``LogMelFeatures``.

Two presets (see :class:`~ebranchformer.asr.feature_config.FeatureConfig`):

* ``"espnet"``: equal to ESPnet's ``DefaultFrontend`` (``Stft`` + ``LogMel``): ``torch.stft`` with a periodic
  window of ``win_length`` zero-padded (centred) to ``n_fft``, ``center=True`` reflect padding, not
  normalised, one-sided; power ``re^2 + im^2``; librosa's Slaney mel banks; ``log(max(x, 1e-10))``. Frame
  count ``(S + 2 * (n_fft // 2) - n_fft) // hop + 1`` (``(S - n_fft) // hop + 1`` without centring); frames
  past a row's length are set to 0.0. As in ESPnet the whole padded batch is transformed at once, so the last
  frames of a shorter row see the zero padding after it (not a reflection of its own end); padded samples are
  zeroed here first, so any padding value gives what zero padding gives.
* ``"kaldi"``: within 1e-3 of kaldi-native-fbank's ``OnlineFbank`` (dither 0, snip_edges, DC removal,
  pre-emphasis 0.97, Povey window, power spectrum, Kaldi mel banks, ``log(max(x, FLT_EPSILON))``). Frame count
  ``(S - win_length) // hop + 1``. Samples are used as given (kaldi-native-fbank does not rescale float
  input); set ``waveform_scale=32768`` for Kaldi's compute-fbank numbers on 16-bit audio.

This module also re-exports the pieces it is built from: :class:`FeatureConfig`,
:func:`slaney_mel_filterbank`, :func:`kaldi_mel_filterbank`, :class:`GlobalMVN` and :func:`compute_stats`.

Example:
    >>> import torch
    >>> from ebranchformer.asr.features import FeatureConfig, LogMelFeatures
    >>> fe = LogMelFeatures(FeatureConfig.espnet())
    >>> feats, lens = fe(torch.randn(2, 16000), torch.tensor([16000, 8000]))
    >>> tuple(feats.shape), lens.tolist()
    ((2, 101, 80), [101, 51])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ebranchformer.asr.feature_config import FeatureConfig
from ebranchformer.asr.global_mvn import GlobalMVN, compute_stats
from ebranchformer.asr.mel_filterbank import kaldi_mel_filterbank, slaney_mel_filterbank
from ebranchformer.nn.masking import lengths_to_valid

__all__ = [
    "FeatureConfig",
    "GlobalMVN",
    "LogMelFeatures",
    "compute_stats",
    "kaldi_mel_filterbank",
    "slaney_mel_filterbank",
]


def _kaldi_window(name: str, length: int) -> torch.Tensor:
    """Kaldi's symmetric analysis windows (feature-window.cc), float64 (length,)."""
    i = torch.arange(length, dtype=torch.float64)
    a = 2.0 * math.pi / (length - 1) if length > 1 else 0.0
    if name == "rectangular":
        return torch.ones(length, dtype=torch.float64)
    if name == "hamming":
        return 0.54 - 0.46 * torch.cos(a * i)
    hann = 0.5 - 0.5 * torch.cos(a * i)
    return hann if name == "hanning" else hann.pow(0.85)  # "povey"


class LogMelFeatures(nn.Module):
    """Waveforms (B, S) to log-mel features (B, T, n_mels) with output lengths; see the module docstring.

    The window and mel matrix are non-persistent buffers (derived from ``config``; not in the state_dict).
    Computation runs in the waveform's dtype (float16/bfloat16 input is computed in float32).

    Args:
        config: a :class:`FeatureConfig`; default ``FeatureConfig.espnet()``.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        super().__init__()
        config = FeatureConfig.espnet() if config is None else config
        if not isinstance(config, FeatureConfig):
            raise TypeError(f"config must be a FeatureConfig, got {type(config).__name__}")
        self.config = config
        c = config
        if c.preset == "espnet":
            window = getattr(torch, f"{c.window}_window")(c.win_length, dtype=torch.float32)  # periodic
            banks = slaney_mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
        else:
            window = _kaldi_window(c.window, c.win_length).float()
            banks = kaldi_mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
        self.register_buffer("window", window, persistent=False)  # (win_length,)
        mel_matrix = torch.from_numpy(np.ascontiguousarray(banks.T, dtype=np.float32))  # (n_freq, n_mels)
        self.register_buffer("mel_matrix", mel_matrix, persistent=False)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"preset={c.preset!r}, n_mels={c.n_mels}, n_fft={c.n_fft}, win={c.win_length}, hop={c.hop_length}"
        )

    def num_frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Frames produced for ``num_samples`` samples (int or integer tensor); 0 when too short."""
        c = self.config
        if c.preset == "kaldi":
            extra = -c.win_length
        else:
            extra = 2 * (c.n_fft // 2) - c.n_fft if c.center else -c.n_fft
        if isinstance(num_samples, torch.Tensor):
            n = torch.div(num_samples.long() + extra, c.hop_length, rounding_mode="floor") + 1
            return n.clamp(min=0)
        return max(0, (int(num_samples) + extra) // c.hop_length + 1)

    def forward(
        self, wav: torch.Tensor, wav_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute features.

        Args:
            wav: float (B, S), zero- or otherwise padded after each row's length.
            wav_lengths: integer (B,), each in [config.min_num_samples, S]; None means all S.

        Returns:
            feats (B, T, n_mels) with frames past each row's length set to 0.0, T = ``num_frames(S)``;
            feat_lengths int64 (B,) = ``num_frames(wav_lengths)``.
        """
        wav, wav_lengths = self._check_input(wav, wav_lengths)
        c = self.config
        valid = lengths_to_valid(wav_lengths, wav.shape[1])  # (B, S)
        x = wav.masked_fill(~valid, 0.0)  # (B, S)
        if c.waveform_scale != 1.0:
            x = x * c.waveform_scale
        power = self._espnet_power(x) if c.preset == "espnet" else self._kaldi_power(x)  # (B, T, n_freq)
        mel = torch.matmul(power, self.mel_matrix.to(power.dtype))  # (B, T, n_mels)
        feats = mel.clamp(min=c.log_floor).log()  # (B, T, n_mels)
        feat_lengths = self.num_frames(wav_lengths)  # (B,)
        frame_valid = lengths_to_valid(feat_lengths, feats.shape[1])  # (B, T)
        feats = feats.masked_fill(~frame_valid[:, :, None], 0.0)  # (B, T, n_mels)
        return feats, feat_lengths

    def _espnet_power(self, x: torch.Tensor) -> torch.Tensor:
        """torch.stft as ESPnet's ``Stft`` calls it, then re^2 + im^2: (B, S) -> (B, T, n_freq)."""
        c = self.config
        spec = torch.stft(
            x,
            n_fft=c.n_fft,
            hop_length=c.hop_length,
            win_length=c.win_length,
            window=self.window.to(x.dtype),
            center=c.center,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )  # (B, n_freq, T)
        ri = torch.view_as_real(spec).transpose(1, 2)  # (B, T, n_freq, 2)
        return ri[..., 0] ** 2 + ri[..., 1] ** 2  # (B, T, n_freq)

    def _kaldi_power(self, x: torch.Tensor) -> torch.Tensor:
        """Kaldi framing (snip_edges), DC removal, pre-emphasis, window, padded FFT power: (B, S) -> (B, T,
        n_freq)."""
        c = self.config
        frames = x.unfold(1, c.win_length, c.hop_length)  # (B, T, win_length)
        if c.remove_dc_offset:
            frames = frames - frames.mean(dim=-1, keepdim=True)  # (B, T, win_length)
        if c.preemphasis != 0.0:
            prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # (B, T, win_length)
            frames = frames - c.preemphasis * prev  # (B, T, win_length)
        frames = frames * self.window.to(frames.dtype)  # (B, T, win_length)
        spec = torch.fft.rfft(frames, n=c.n_fft, dim=-1)  # (B, T, n_freq)
        return spec.real**2 + spec.imag**2  # (B, T, n_freq)

    def _check_input(
        self, wav: torch.Tensor, wav_lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        min_n = self.config.min_num_samples
        if not isinstance(wav, torch.Tensor):
            raise TypeError(f"wav must be a float torch.Tensor of shape (B, S), got {type(wav).__name__}")
        if not wav.is_floating_point():
            raise TypeError(f"wav must be a floating-point tensor, got dtype {wav.dtype}")
        if wav.dim() != 2:
            raise ValueError(f"wav must have shape (B, S), got {tuple(wav.shape)}")
        if wav.shape[0] == 0:
            raise ValueError(f"wav must hold at least one utterance, got batch size 0 (wav.shape={tuple(wav.shape)})")
        if wav.shape[1] < min_n:
            raise ValueError(
                f"wav has {wav.shape[1]} samples per row, fewer than one frame: "
                f"the {self.config.preset!r} preset "
                f"needs at least {min_n}"
            )
        if wav.dtype in (torch.float16, torch.bfloat16):
            wav = wav.float()
        if wav_lengths is None:
            return wav, torch.full((wav.shape[0],), wav.shape[1], dtype=torch.int64, device=wav.device)
        if not isinstance(wav_lengths, torch.Tensor):
            raise TypeError(
                f"wav_lengths must be an integer torch.Tensor (B,), got {type(wav_lengths).__name__}"
            )
        if wav_lengths.is_floating_point() or wav_lengths.is_complex() or wav_lengths.dtype == torch.bool:
            raise TypeError(f"wav_lengths must be an integer tensor, got dtype {wav_lengths.dtype}")
        if wav_lengths.shape != (wav.shape[0],):
            raise ValueError(
                f"wav_lengths must have shape ({wav.shape[0]},) to match wav, got {tuple(wav_lengths.shape)}"
            )
        if wav_lengths.numel() == 0:
            return wav, wav_lengths.to(device=wav.device, dtype=torch.int64)
        lo, hi = int(wav_lengths.min()), int(wav_lengths.max())
        if lo < min_n or hi > wav.shape[1]:
            raise ValueError(
                f"wav_lengths must lie in [{min_n}, {wav.shape[1]}] (one frame .. wav.shape[1]), "
                f"got min {lo}, "
                f"max {hi}"
            )
        return wav, wav_lengths.to(device=wav.device, dtype=torch.int64)
