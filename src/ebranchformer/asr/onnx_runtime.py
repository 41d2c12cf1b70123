"""Speech recognition with an exported CTC model under onnxruntime, in numpy: no torch on this path.

The ONNX file is an export of a model's ``"ctc"`` part (:func:`ebranchformer.interop.export.export_model` with
``part="ctc"``): raw log-mel features (B, T, F) with lengths (B,) in, ``log_probs`` (B, T', V) out, the
normalization inside the graph. Everything else comes from the file's metadata: the feature configuration
(the ``"espnet"`` or ``"kaldi"`` preset, computed here in numpy with the mel banks of
:mod:`ebranchformer.asr.mel_filterbank`), the token list and how tokens become text (a sentencepiece model is
embedded for ``bpe``), the blank id and the shortest input the graph accepts. Decoding is greedy
(``beam=1``) or CTC prefix beam search, both in numpy.

Features are computed one utterance at a time (what ESPnet's inference does, and what the torch frontend
gives for a batch of one), then padded into batches; the exported graph is batch-invariant, so the result
does not depend on the batching.

In a model directory the file is ``model.ctc.onnx`` (:data:`ONNX_CTC_NAME`); write it with
``ebranchformer export DIR --format onnx --part ctc --out DIR/model.ctc.onnx``.

Imports: numpy, onnxruntime, soundfile/soxr (audio files), sentencepiece (bpe models), and this package's
torch-free modules (``feature_config``, ``mel_filterbank``, ``tokenizer``, ``audio``).

Example:
    >>> from ebranchformer.asr.onnx_runtime import transcribe_onnx
    >>> transcribe_onnx("models/ls100_ebf", ["utt1.wav", "utt2.flac"], beam=4)  # doctest: +SKIP
    [('utt1.wav', 'hello world'), ('utt2.flac', 'good morning')]
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ebranchformer.asr.feature_config import FeatureConfig
from ebranchformer.asr.mel_filterbank import kaldi_mel_filterbank, slaney_mel_filterbank
from ebranchformer.asr.tokenizer import TokenListTokenizer

__all__ = [
    "ONNX_CTC_NAME",
    "OnnxCTCModel",
    "ctc_greedy_np",
    "ctc_prefix_beam_search_np",
    "log_mel",
    "transcribe_onnx",
]

ONNX_CTC_NAME = "model.ctc.onnx"
_EXPORT_FORMAT = "ebranchformer-export"


# --------------------------------------------------------------------------------------------- features


def _espnet_window(name: str, win_length: int, n_fft: int) -> np.ndarray:
    """torch's periodic ``<name>_window(win_length)`` zero-padded (centred) to n_fft, as torch.stft pads it."""
    phase = 2.0 * math.pi * np.arange(win_length) / win_length
    if name == "hann":
        w = 0.5 - 0.5 * np.cos(phase)
    elif name == "hamming":
        w = 0.54 - 0.46 * np.cos(phase)
    else:  # "blackman"
        w = 0.42 - 0.5 * np.cos(phase) + 0.08 * np.cos(2.0 * phase)
    left = (n_fft - win_length) // 2
    return np.pad(_as_f32(w), (left, n_fft - win_length - left))  # (n_fft,)


def _kaldi_window(name: str, length: int) -> np.ndarray:
    """Kaldi's symmetric analysis windows (feature-window.cc), (length,)."""
    if name == "rectangular":
        return np.ones(length)
    a = 2.0 * math.pi / (length - 1) if length > 1 else 0.0
    i = np.arange(length)
    if name == "hamming":
        return _as_f32(0.54 - 0.46 * np.cos(a * i))
    hann = 0.5 - 0.5 * np.cos(a * i)
    return _as_f32(hann if name == "hanning" else hann**0.85)  # "povey"


def _as_f32(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to float32 (how the torch frontend holds its windows and mel banks), as float64."""
    return a.astype(np.float32).astype(np.float64)


def _frames(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    """Frames (T, length) every ``hop`` samples, T = (len(x) - length) // hop + 1."""
    return np.lib.stride_tricks.sliding_window_view(x, length)[::hop]


def log_mel(wav: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Log-mel features (T, n_mels) float32 of one waveform (S,), equal (to float32 rounding) to
    :class:`ebranchformer.asr.features.LogMelFeatures` on a batch of one. Computed in float64.

    Raises ValueError when ``wav`` is not 1-D or shorter than ``config.min_num_samples``.
    """
    if not isinstance(config, FeatureConfig):
        raise TypeError(f"config must be a FeatureConfig, got {type(config).__name__}")
    x = np.asarray(wav)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"wav must be a 1-D float array (samples), got {x.dtype} {x.shape}")
    c = config
    if x.shape[0] < c.min_num_samples:
        raise ValueError(f"wav has {x.shape[0]} samples, fewer than one frame ({c.min_num_samples})")
    x = x.astype(np.float64) * c.waveform_scale
    if c.preset == "espnet":
        if c.center:
            x = np.pad(x, (c.n_fft // 2, c.n_fft // 2), mode="reflect")
        frames = _frames(x, c.n_fft, c.hop_length) * _espnet_window(c.window, c.win_length, c.n_fft)
        banks = slaney_mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
    else:
        frames = _frames(x, c.win_length, c.hop_length)  # (T, win_length)
        if c.remove_dc_offset:
            frames = frames - frames.mean(axis=1, keepdims=True)
        if c.preemphasis != 0.0:
            frames = frames - c.preemphasis * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames = frames * _kaldi_window(c.window, c.win_length)
        banks = kaldi_mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
    spec = np.fft.rfft(frames, n=c.n_fft, axis=1)  # (T, n_freq)
    power = spec.real**2 + spec.imag**2
    mel = power @ _as_f32(banks).T  # (T, n_mels)
    return np.log(np.maximum(mel, c.log_floor)).astype(np.float32)


# --------------------------------------------------------------------------------------------- decoding


def _check_log_probs(log_probs: Any, blank_id: int) -> np.ndarray:
    lp = np.asarray(log_probs)
    if lp.ndim != 2 or not np.issubdtype(lp.dtype, np.floating):
        raise ValueError(f"log_probs must be a float array (T, V), got {lp.dtype} {lp.shape}")
    if isinstance(blank_id, bool) or not isinstance(blank_id, int) or not 0 <= blank_id < lp.shape[1]:
        raise ValueError(f"blank_id must be an int in [0, V={lp.shape[1]}), got {blank_id!r}")
    if np.isnan(lp).any():
        raise ValueError("log_probs holds NaN")
    return lp


def ctc_greedy_np(log_probs: np.ndarray, blank_id: int = 0) -> list[int]:
    """Best-path decoding of one utterance's (T, V) scores: argmax per frame (ties to the lowest id),
    collapse repeats, drop blanks. Equals :func:`ebranchformer.asr.decoding.ctc_greedy`."""
    best = _check_log_probs(log_probs, blank_id).argmax(axis=1)  # (T,)
    keep = np.ones(best.shape, dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(t) for t in best[keep & (best != blank_id)]]


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) of two Python floats (faster than numpy on scalars)."""
    if a < b:
        a, b = b, a
    if b == -math.inf:
        return a
    return a + math.log1p(math.exp(b - a))


def _add(
    grown: dict[tuple[int, ...], list[float]], prefix: tuple[int, ...], which: int, value: float
) -> None:
    entry = grown.setdefault(prefix, [-math.inf, -math.inf])
    entry[which] = _logaddexp(entry[which], value)


def ctc_prefix_beam_search_np(
    log_probs: np.ndarray, beam: int = 8, blank_id: int = 0, token_prune: int | None = 16
) -> list[int]:
    """The best labelling of one utterance's (T, V) CTC log-probabilities by prefix beam search.

    Each prefix keeps the log-probability of its alignments ending in a blank and ending in its last token;
    per frame, a prefix may grow by the ``token_prune`` most probable non-blank tokens (None: all), or by its
    successor's last token when that prefix is also in the beam; the ``beam`` most probable prefixes survive.
    Same search (and results, up to exact ties) as :func:`ebranchformer.asr.decoding.ctc_prefix_beam_search`
    with its defaults.
    """
    lp = _check_log_probs(log_probs, blank_id).astype(np.float64)
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an int >= 1, got {beam!r}")
    if token_prune is not None and (
        isinstance(token_prune, bool) or not isinstance(token_prune, int) or token_prune < 1
    ):
        raise ValueError(f"token_prune must be an int >= 1 or None, got {token_prune!r}")
    neg = -math.inf
    non_blank = np.array([v for v in range(lp.shape[1]) if v != blank_id], dtype=np.int64)
    beams: dict[tuple[int, ...], tuple[float, float]] = {
        (): (0.0, neg)
    }  # prefix -> (log p_blank, log p_token)
    for row_np in lp:
        row = row_np.tolist()
        cand = non_blank
        if token_prune is not None and token_prune < cand.size:
            cand = cand[np.argpartition(-row_np[cand], token_prune - 1)[:token_prune]]
        cand_list = [int(c) for c in cand]
        cand_set = set(cand_list)
        children: dict[tuple[int, ...], list[int]] = {}  # prefix -> last tokens of its extensions in the beam
        for p in beams:
            if p:
                children.setdefault(p[:-1], []).append(p[-1])
        grown: dict[
            tuple[int, ...], list[float]
        ] = {}  # prefix -> [log p_blank, log p_token] after this frame
        for prefix, (pb, pt) in beams.items():
            total = _logaddexp(pb, pt)
            _add(grown, prefix, 0, total + row[blank_id])  # a blank frame
            if prefix:
                _add(grown, prefix, 1, pt + row[prefix[-1]])  # the last token again, no blank in between
            extra = [c for c in children.get(prefix, ()) if c not in cand_set]
            for c in cand_list + extra:
                _add(grown, prefix + (c,), 1, (pb if prefix and c == prefix[-1] else total) + row[c])
        ranked = sorted(grown.items(), key=lambda kv: -_logaddexp(*kv[1]))
        kept = [kv for kv in ranked[:beam] if _logaddexp(*kv[1]) > neg] or ranked[:1]
        beams = {p: (v[0], v[1]) for p, v in kept}
    best = max(beams.items(), key=lambda kv: _logaddexp(*kv[1]))[0]
    return list(best)


# --------------------------------------------------------------------------------------------- the model


class OnnxCTCModel:
    """An exported CTC model (``part="ctc"``) under onnxruntime.

    Args:
        path: the ``.onnx`` file, or a model directory holding :data:`ONNX_CTC_NAME`.
        providers: onnxruntime execution providers (Default ``["CPUExecutionProvider"]``).

    Attributes: ``metadata`` (dict of str), ``feature_config`` (:class:`FeatureConfig`), ``tokenizer``
    (:class:`TokenListTokenizer` or None), ``blank_id``, ``min_input_frames``.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        path = _onnx_path(path)
        self.path = path
        self.session = ort.InferenceSession(
            os.fspath(path), providers=list(providers or ["CPUExecutionProvider"])
        )
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        where = repr(os.fspath(path))
        if meta.get("format") != _EXPORT_FORMAT or meta.get("part") != "ctc":
            raise ValueError(
                f"{where} is not an ebranchformer CTC export (metadata format={meta.get('format')!r}, "
                f"part={meta.get('part')!r}); export it with part='ctc'"
            )
        try:
            fc = json.loads(meta["feature_config"])
            self.feature_config = FeatureConfig.from_dict(fc) if fc is not None else None
            tokens = json.loads(meta["vocabulary"])
            tok = json.loads(meta["tokenizer"])
            self.blank_id = int(meta["blank_id"])
            self.min_input_frames = int(meta["min_input_frames"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{where}: malformed ebranchformer metadata: {e}") from e
        self.tokenizer = None
        if tok is not None and tokens is not None:
            model = base64.b64decode(tok["bpemodel_base64"]) if tok.get("bpemodel_base64") else None
            self.tokenizer = TokenListTokenizer(
                tokens, text_kind=tok["text_kind"], bpemodel=model, space_symbol=tok["space_symbol"]
            )
        self._input_names = [i.name for i in self.session.get_inputs()]

    def features(self, wav: np.ndarray) -> np.ndarray:
        """Log-mel features (T, F) float32 of one waveform (S,) at the model's sample rate."""
        if self.feature_config is None:
            raise ValueError(
                f"{os.fspath(self.path)!r} has no feature configuration (a features-input model)"
            )
        return log_mel(wav, self.feature_config)

    def log_probs(self, feats: Sequence[np.ndarray]) -> list[np.ndarray]:
        """CTC log-probabilities (T'_i, V) of each feature matrix (T_i, F), run as one padded batch."""
        if not feats:
            return []
        f_dim = feats[0].shape[1]
        lengths = np.array([f.shape[0] for f in feats], dtype=np.int64)
        short = [i for i, n in enumerate(lengths.tolist()) if n < self.min_input_frames]
        if short:
            raise ValueError(
                f"feats {short} have fewer than the {self.min_input_frames} frames the model needs: {lengths[short].tolist()}"
            )
        batch = np.zeros((len(feats), int(lengths.max()), f_dim), dtype=np.float32)
        for i, f in enumerate(feats):
            batch[i, : f.shape[0]] = f
        lp, lp_lengths = self.session.run(None, {self._input_names[0]: batch, self._input_names[1]: lengths})
        return [lp[i, : int(n)] for i, n in enumerate(lp_lengths)]

    def decode(self, log_probs: np.ndarray, beam: int = 1) -> list[int]:
        """Token ids of one utterance: greedy for ``beam == 1``, prefix beam search otherwise."""
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ValueError(f"beam must be an int >= 1, got {beam!r}")
        if beam == 1:
            return ctc_greedy_np(log_probs, self.blank_id)
        return ctc_prefix_beam_search_np(log_probs, beam=beam, blank_id=self.blank_id)

    def transcribe(
        self, audio: Sequence[np.ndarray | str | os.PathLike], beam: int = 1, batch_size: int = 16
    ) -> list[str]:
        """Texts of waveforms (1-D float arrays at the model's sample rate) or audio files (resampled)."""
        if self.tokenizer is None:
            raise ValueError(f"{os.fspath(self.path)!r} carries no tokenizer: it cannot produce text")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(audio, (str, os.PathLike, np.ndarray)):
            raise TypeError("audio must be a list of waveforms or file paths")
        feats = [self._item_features(a, i) for i, a in enumerate(audio)]
        order = sorted(range(len(feats)), key=lambda i: -feats[i].shape[0])
        texts = [""] * len(feats)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, lp in zip(idx, self.log_probs([feats[i] for i in idx])):
                texts[i] = self.tokenizer.transcript(self.decode(lp, beam))
        return texts

    def _item_features(self, item: Any, index: int) -> np.ndarray:
        rate = self.feature_config.sample_rate if self.feature_config is not None else None
        if isinstance(item, (str, os.PathLike)):
            from ebranchformer.asr.audio import load_audio

            wav, name = load_audio(item, rate), repr(os.fspath(item))
        elif isinstance(item, np.ndarray):
            wav, name = item, f"audio[{index}]"
        else:
            raise TypeError(
                f"audio[{index}] must be a 1-D float array or a file path, got {type(item).__name__}"
            )
        try:
            feats = self.features(wav)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if feats.shape[0] < self.min_input_frames:
            raise ValueError(
                f"{name} is too short: {feats.shape[0]} feature frames, the model needs {self.min_input_frames}"
            )
        return feats


def _onnx_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model_dir_or_onnx must be a path, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        if not (p / ONNX_CTC_NAME).is_file():
            raise FileNotFoundError(
                f"{str(p)!r} has no {ONNX_CTC_NAME}; create it with: ebranchformer export {p} --format onnx "
                f"--part ctc --out {p / ONNX_CTC_NAME}"
            )
        return p / ONNX_CTC_NAME
    if not p.is_file():
        raise FileNotFoundError(f"model_dir_or_onnx {str(p)!r} does not exist")
    return p


def transcribe_onnx(
    model_dir_or_onnx: str | os.PathLike,
    audio_paths: Sequence[str | os.PathLike],
    beam: int = 1,
    *,
    batch_size: int = 16,
    providers: Sequence[str] | None = None,
) -> list[tuple[str, str]]:
    """Transcribe audio files with an exported CTC model under onnxruntime (numpy only, no torch).

    Args:
        model_dir_or_onnx: a model directory holding ``model.ctc.onnx``, or the ``.onnx`` file itself.
        audio_paths: audio files (any format soundfile reads; resampled to the model's rate).
        beam: 1 for greedy decoding (Default), > 1 for CTC prefix beam search with that beam.
        batch_size: utterances per onnxruntime call. Default 16.
        providers: onnxruntime execution providers. Default CPU.

    Returns:
        ``[(path, text), ...]`` in the order of ``audio_paths``.
    """
    if isinstance(audio_paths, (str, os.PathLike)):
        raise TypeError("audio_paths must be a list of paths, not a single path")
    paths = list(audio_paths)
    for i, p in enumerate(paths):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"audio_paths[{i}] must be a path, got {type(p).__name__}")
    model = OnnxCTCModel(model_dir_or_onnx, providers=providers)
    texts = model.transcribe(paths, beam=beam, batch_size=batch_size)
    return [(os.fspath(p), t) for p, t in zip(paths, texts)]
