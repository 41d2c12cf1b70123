"""``CTCModel``: a CTC speech recognizer around the E-Branchformer / Conformer encoder.

Pipeline: waveform (B, S) -> log-mel features (B, T, F) -> global mean/variance normalization -> SpecAugment
(training only) -> :class:`~ebranchformer.nn.ConformerEncoder` (B, T', D) -> CTC head (Linear D -> V).

(ESPnet applies SpecAugment *before* the normalization; here it comes after, so a zero-filled mask is the
training-set mean. Inference is the same either way.)

InterCTC (Lee & Watanabe 2021) and self-conditioning (Nozaki & Komatsu 2021), as ESPnet does them for the
E-Branchformer: the outputs of the encoder layers ``encoder["interctc_layers"]`` (1-based) go through the same
CTC head for extra losses, ``loss = (1 - w) * ctc + w * mean(interctc)`` with ``w = interctc_weight``; with
``interctc_use_conditioning`` the encoder adds ``Linear(softmax(ctc_head.linear(x)))`` after those layers.

Models without the waveform frontend (``ModelConfig(features=None, feature_dim=F)``, e.g. an imported encoder
fed with precomputed features) use the ``*_features`` methods.

Example:
    >>> import torch
    >>> from ebranchformer.asr.model_config import ModelConfig, default_encoder
    >>> cfg = ModelConfig(vocab_size=6, encoder={**default_encoder(out_dim=32), "num_layers": 2})
    >>> model = CTCModel(cfg)
    >>> wav, wav_lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    >>> tokens, token_lengths = torch.tensor([[1, 2, 3], [4, 5, -1]]), torch.tensor([3, 2])
    >>> loss, stats = model(wav, wav_lengths, tokens, token_lengths)
    >>> lp, lens = model.log_probs(wav, wav_lengths)  # (B, T', V) float32
    >>> tuple(lp.shape), lens.tolist()
    ((2, 24, 6), [24, 18])
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ebranchformer.asr.audio import load_audio, resample
from ebranchformer.asr.ctc_head import CTCHead, check_targets
from ebranchformer.asr.decoding import ctc_greedy, ctc_prefix_beam_search
from ebranchformer.asr.features import LogMelFeatures
from ebranchformer.asr.global_mvn import GlobalMVN
from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.specaug import SpecAugment
from ebranchformer.asr.tokenizer import Tokenizer
from ebranchformer.nn.encoder import ConformerEncoder
from ebranchformer.nn.masking import check_encoder_input

__all__ = ["CTCModel", "ModelConfig"]

AudioInput = np.ndarray | torch.Tensor | str | os.PathLike


def identity_mvn(dim: int) -> GlobalMVN:
    """A GlobalMVN with mean 0 and std 1 (placeholder until real statistics are set or loaded)."""
    return GlobalMVN(1, np.zeros(dim), np.ones(dim))


def padded_batches(wavs: Sequence[np.ndarray], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Waveforms (S_i,) longest first, ``batch_size`` at a time: ``(indices, batch (b, S) zero-padded, lengths (b,)
    int64)`` on the CPU, ``indices`` into ``wavs``."""
    order = sorted(range(len(wavs)), key=lambda i: -len(wavs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lengths = torch.tensor([len(wavs[i]) for i in idx], dtype=torch.int64)  # (b,)
        batch = torch.zeros(len(idx), int(lengths.max()))  # (b, S)
        for row, i in enumerate(idx):
            batch[row, : len(wavs[i])] = torch.from_numpy(wavs[i])
        yield idx, batch, lengths


class CTCModel(nn.Module):
    """CTC recognizer (see the module doc).

    Args:
        config: a :class:`ModelConfig` with ``vocab_size`` set.
        tokenizer: optional :class:`~ebranchformer.asr.tokenizer.Tokenizer` (needed by :meth:`transcribe` and
            saved with the model); its ``vocab_size`` must equal ``config.vocab_size``.
        normalizer: optional :class:`GlobalMVN` with the training-set statistics when ``config.normalize`` is
            "global_mvn"; default: identity statistics (set real ones with :meth:`set_normalizer`).

    Submodules: ``frontend`` (LogMelFeatures or None), ``normalize`` (GlobalMVN or None), ``specaug``
    (SpecAugment or None), ``encoder`` (ConformerEncoder), ``ctc`` (CTCHead).
    """

    def __init__(
        self, config: ModelConfig, tokenizer: Tokenizer | None = None, normalizer: GlobalMVN | None = None
    ) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError(
                "config.vocab_size must be set (e.g. config.replace(vocab_size=tokenizer.vocab_size))"
            )
        self.config = config
        self.frontend = LogMelFeatures(config.features) if config.features is not None else None
        self.normalize: GlobalMVN | None = None
        if config.normalize == "global_mvn":
            self.set_normalizer(normalizer if normalizer is not None else identity_mvn(config.in_dim))
        elif normalizer is not None:
            raise ValueError("normalizer given but config.normalize is None")
        self.specaug = SpecAugment(config.specaug) if config.specaug is not None else None
        self.encoder = ConformerEncoder.from_config(config.encoder_config())
        self.ctc = CTCHead(config.model_dim, config.vocab_size, config.ctc_dropout, config.ctc_zero_infinity)
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # -- components ------------------------------------------------------------------------------------------
    def set_normalizer(self, normalizer: GlobalMVN) -> None:
        """Use ``normalizer`` (a :class:`GlobalMVN` of dim F) for feature normalization."""
        if self.config.normalize != "global_mvn":
            raise ValueError("this model has no normalization (config.normalize is None)")
        if not isinstance(normalizer, GlobalMVN):
            raise TypeError(f"normalizer must be a GlobalMVN, got {type(normalizer).__name__}")
        if normalizer.dim != self.config.in_dim:
            raise ValueError(
                f"normalizer dim must be the feature dim {self.config.in_dim}, got {normalizer.dim}"
            )
        param = next(self.parameters(), None)  # None while __init__ runs
        self.normalize = normalizer if param is None else normalizer.to(param.device)

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Attach the tokenizer used by :meth:`transcribe` (its vocab_size must equal config.vocab_size)."""
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
        if tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {tokenizer.vocab_size} != config.vocab_size {self.config.vocab_size}"
            )
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- forward passes --------------------------------------------------------------------------------------
    def features(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features (B, T, F) in the model's dtype and lengths int64 (B,) of waveforms (B, S) with lengths
        (B,)."""
        if self.frontend is None:
            raise ValueError("this model has no waveform frontend (config.features is None); use *_features")
        if not isinstance(wav, torch.Tensor):
            raise TypeError(f"wav must be a float tensor (B, S), got {type(wav).__name__}")
        with torch.autocast(wav.device.type, enabled=False):  # power spectra overflow float16: keep float32
            wav = wav if wav.dtype in (torch.float32, torch.float64) else wav.float()
            feats, lengths = self.frontend(wav, wav_lengths)
        return feats.to(next(self.encoder.parameters()).dtype), lengths

    def encode_features(
        self,
        feats: torch.Tensor,
        feat_lengths: torch.Tensor,
        *,
        collected_outputs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalize, SpecAugment (training only) and encode features (B, T, F): -> (B, T', D), lengths (B,).

        ``collected_outputs``, if a dict, receives each encoder layer's output under ``str(i)`` (0-based).
        """
        check_encoder_input(feats, feat_lengths, self.config.in_dim)
        if self.normalize is not None:
            feats, feat_lengths = self.normalize(feats, feat_lengths)
        if self.specaug is not None and self.training:
            feats, feat_lengths = self.specaug(feats, feat_lengths)
        conditioning = self.config.encoder["interctc_use_conditioning"]
        return self.encoder(
            feats,
            feat_lengths,
            ctc=self.ctc.linear if conditioning else None,
            collected_outputs=collected_outputs,
        )

    def encode(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms (B, S) -> encoder output (B, T', D) and lengths int64 (B,)."""
        return self.encode_features(*self.features(wav, wav_lengths))

    def forward(
        self,
        wav: torch.Tensor,
        wav_lengths: torch.Tensor,
        tokens: torch.Tensor,
        token_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of a batch.

        Args:
            wav: float (B, S), padded past ``wav_lengths``.
            wav_lengths: int (B,).
            tokens: int (B, U), ids in [1, V), padded with -1 past ``token_lengths``.
            token_lengths: int (B,) in [1, U].

        Returns:
            (loss, stats): the scalar loss (batch mean, ESPnet's reduction) and floats ``loss``,
            ``loss_ctc``, ``loss_interctc_layer{i}`` (1-based i, when interCTC is on), ``frames`` (encoder
            output frames of the batch), ``feat_frames`` and ``batch_size``.
        """
        feats, feat_lengths = self.features(wav, wav_lengths)
        return self.forward_features(feats, feat_lengths, tokens, token_lengths)

    def forward_features(
        self,
        feats: torch.Tensor,
        feat_lengths: torch.Tensor,
        tokens: torch.Tensor,
        token_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`forward` from features (B, T, F) with lengths (B,)."""
        check_encoder_input(feats, feat_lengths, self.config.in_dim)
        check_targets(tokens, token_lengths, feats.shape[0], self.config.vocab_size)
        collected: dict[str, torch.Tensor] | None = {} if self.config.interctc_weight > 0 else None
        h, h_lengths = self.encode_features(feats, feat_lengths, collected_outputs=collected)
        loss, stats = self.ctc_losses(h, h_lengths, tokens, token_lengths, collected_outputs=collected)
        stats["feat_frames"] = float(feat_lengths.sum())
        return loss, stats

    def ctc_losses(
        self,
        h: torch.Tensor,
        h_lengths: torch.Tensor,
        tokens: torch.Tensor,
        token_lengths: torch.Tensor,
        collected_outputs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of encoder output ``h`` (B, T', D) with lengths (B,) (what :meth:`forward` adds up).

        ``collected_outputs`` (from :meth:`encode_features`) supplies the interCTC layers' outputs; it is
        needed when ``interctc_weight > 0``. Returns (loss, stats) as :meth:`forward` (without feat_frames).
        """
        tokens, token_lengths = tokens.to(h.device), token_lengths.to(h.device)
        loss_ctc = self.ctc.loss(h, h_lengths, tokens, token_lengths)
        stats: dict[str, float] = {"loss_ctc": float(loss_ctc.detach())}
        loss = loss_ctc
        if self.config.interctc_weight > 0:
            if collected_outputs is None:
                raise ValueError("collected_outputs is needed for interCTC (interctc_weight > 0)")
            inter = []
            for i in self.config.encoder["interctc_layers"]:  # 1-based layer index; collected is 0-based
                loss_i = self.ctc.loss(collected_outputs[str(i - 1)], h_lengths, tokens, token_lengths)
                stats[f"loss_interctc_layer{i}"] = float(loss_i.detach())
                inter.append(loss_i)
            w = self.config.interctc_weight
            loss = (1.0 - w) * loss_ctc + w * torch.stack(inter).mean()
        stats["loss"] = float(loss.detach())
        stats["frames"] = float(h_lengths.sum())
        stats["batch_size"] = float(h.shape[0])
        return loss, stats

    def log_probs_features(
        self, feats: torch.Tensor, feat_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities (B, T', V) float32 and lengths int64 (B,) of features (B, T, F)."""
        h, h_lengths = self.encode_features(feats, feat_lengths)
        return self.ctc.log_probs(h), h_lengths

    def log_probs(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities (B, T', V) float32 and lengths int64 (B,) of waveforms (B, S)."""
        return self.log_probs_features(*self.features(wav, wav_lengths))

    # -- recognition -----------------------------------------------------------------------------------------
    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor, beam: int = 1) -> list[list[int]]:
        """Token ids per utterance: greedy when ``beam == 1``, CTC prefix beam search otherwise."""
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ValueError(f"beam must be an int >= 1, got {beam!r}")
        if beam == 1:
            return ctc_greedy(log_probs, lengths)
        return ctc_prefix_beam_search(log_probs, lengths, beam=beam)

    @torch.no_grad()
    def transcribe(
        self,
        audio: AudioInput | Sequence[AudioInput],
        beam: int = 1,
        batch_size: int = 16,
        sample_rate: int | None = None,
    ) -> list[str]:
        """Recognize utterances: a list of 1-D float arrays/tensors (samples) or audio file paths.

        Args:
            audio: one item or a list of them. Arrays are taken at ``sample_rate`` (default: the model's
                ``features.sample_rate``) and resampled if that differs; files are read and resampled.
            beam: 1 for greedy decoding, > 1 for CTC prefix beam search with that beam. Default 1.
            batch_size: utterances per forward pass (sorted by length). Default 16.
            sample_rate: rate of array inputs; None means the model's.

        Returns:
            One string per input, in input order.
        """
        if self.tokenizer is None:
            raise ValueError("transcribe needs a tokenizer: pass one to CTCModel(...) or use set_tokenizer")
        if self.frontend is None:
            raise ValueError("transcribe needs the waveform frontend (config.features is None)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        single = isinstance(audio, (np.ndarray, torch.Tensor, str, os.PathLike))
        wavs = [self._read_audio(a, i, sample_rate) for i, a in enumerate([audio] if single else list(audio))]
        texts: list[str] = [""] * len(wavs)
        was_training = self.training
        self.eval()
        try:
            for idx, batch, lengths in padded_batches(wavs, batch_size):
                lp, lp_lengths = self.log_probs(batch.to(self.device), lengths.to(self.device))
                for i, ids in zip(idx, self.decode(lp, lp_lengths, beam)):
                    texts[i] = self.tokenizer.transcript(ids)
        finally:
            self.train(was_training)
        return texts

    def _read_audio(self, item: Any, index: int, sample_rate: int | None) -> np.ndarray:
        """One input as float32 (S,) at the model's rate, long enough for one encoder frame."""
        rate = self.config.features.sample_rate
        if isinstance(item, (str, os.PathLike)):
            wav = load_audio(item, rate)
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            wav = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else item
            if wav.ndim != 1 or not np.issubdtype(wav.dtype, np.floating):
                raise ValueError(
                    f"audio[{index}] must be a 1-D float array (samples), got {wav.dtype} {wav.shape}"
                )
            wav = np.ascontiguousarray(wav, dtype=np.float32)
            if sample_rate is not None and sample_rate != rate:
                wav = resample(wav, sample_rate, rate)
        else:
            raise TypeError(
                f"audio[{index}] must be an array, a tensor or a file path, got {type(item).__name__}"
            )
        needed = self.min_num_samples()
        if wav.shape[0] < needed:
            raise ValueError(f"audio[{index}] is too short: {wav.shape[0]} samples, need at least {needed}")
        return wav

    def min_num_samples(self) -> int:
        """Fewest waveform samples that give at least one encoder output frame."""
        fe = self.frontend
        if fe is None:
            raise ValueError("this model has no waveform frontend (config.features is None)")
        min_frames = getattr(self.encoder.input_layer, "min_length", 1)
        n = fe.config.min_num_samples
        while fe.num_frames(n) < min_frames:  # a few hundred iterations at most (hop-sized jumps)
            n += max(1, (min_frames - fe.num_frames(n)) * fe.config.hop_length)
        return n

    # -- model directory -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write this model as a model directory (:mod:`ebranchformer.asr.model_dir`); returns the path."""
        from ebranchformer.asr.model_dir import save_model

        return save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CTCModel:
        """Read a model directory written by :meth:`save` (model_dir.load_model)."""
        from ebranchformer.asr.model_dir import load_model

        return load_model(path, map_location=map_location)
