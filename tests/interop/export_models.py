"""A tiny CTC model directory and its ONNX exports, built once per test session (not a test module itself).

The model is random but not degenerate: every 1-D parameter is moved off its init value, the normalization
statistics come from real features, and the CTC head is centred on the encoder's mean output so that the greedy
transcripts of the test utterances are non-empty and change from frame to frame.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.features import LogMelFeatures, compute_stats
from ebranchformer.asr.model_config import ModelConfig, default_encoder
from ebranchformer.asr.tokenizer import CharTokenizer
from ebranchformer.interop.export import default_export_name, export_model

from ..nn.conftest import perturb_
from .speech import SENTENCES, utterances


def tiny_config(vocab_size: int, **encoder) -> ModelConfig:
    enc = {**default_encoder(out_dim=32), "num_layers": 2, **encoder}
    enc["encoder_layer"] = {**enc["encoder_layer"], "cgmlp_conv_kernel": 7, "merge_conv_kernel": 5}
    return ModelConfig(vocab_size=vocab_size, specaug=None, encoder=enc)


def make_model(seed: int = 3, **encoder) -> CTCModel:
    """A fresh tiny CTC model (see the module doc), eval mode."""
    tok = CharTokenizer.train(SENTENCES)
    torch.manual_seed(seed)
    model = CTCModel(tiny_config(tok.vocab_size, **encoder), tokenizer=tok)
    fe = LogMelFeatures(model.config.features)
    feats = [fe(torch.from_numpy(w.copy())[None])[0][0] for w in utterances()]
    model.set_normalizer(compute_stats(feats))
    perturb_(model, seed=seed)
    model.eval()
    with torch.no_grad():
        hs = [model.encode_features(f[None], torch.tensor([f.shape[0]]))[0][0] for f in feats]
        mean_h = torch.cat(hs).mean(0)  # (D,)
        head = model.ctc.linear
        head.weight.mul_(20.0)
        head.bias.copy_(-head.weight @ mean_h)
        head.bias[0] += 2.0
    return model


@functools.cache
def _root() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="ebf-export-tests-")


@functools.cache
def model_dir() -> Path:
    """The tiny model saved as a model directory (shared: do not modify)."""
    return make_model().save(Path(_root().name) / "model")


def exported(part: str, format: str = "onnx", optimize: bool = True) -> Path:
    """``part`` of :func:`model_dir`'s model exported into that directory under its default name."""
    return _exported(part, format, optimize)


@functools.cache
def _exported(part: str, format: str, optimize: bool) -> Path:
    out = model_dir() / default_export_name(format, part)
    return export_model(model_dir(), out, format=format, part=part, optimize=optimize)
