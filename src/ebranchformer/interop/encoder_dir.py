"""The encoder-only model directory: a bare :class:`~ebranchformer.nn.ConformerEncoder` on disk.

An imported encoder without features, normalization, tokenizer or output layer (e.g. converted from a RETURNN
checkpoint, which only holds the encoder) is stored as::

    encoder/
      config.json         {"format": "ebranchformer-encoder", "version": 1, "encoder": EncoderConfig.to_dict(),
                           "files": {"weights": "model.safetensors"}, "source": {...}, "library_version": "..."}
      model.safetensors   the encoder's state_dict (parameters and persistent buffers, e.g. BatchNorm statistics)

"Encoder-only" means: the directory maps encoder *inputs* (B, T, in_dim) with lengths (B,) to encoder outputs
(B, T', D) with lengths (B,), nothing else. It has no feature extractor (the caller computes the features the
encoder was trained on), no normalization, no tokenizer and no CTC head, so it cannot ``transcribe``; it can be
run, fine-tuned (e.g. as the encoder of a new :class:`~ebranchformer.asr.ctc_model.CTCModel`) and exported
(:func:`ebranchformer.interop.export.export_model` with ``part="encoder"``). ``"source"`` records where the
weights came from (free-form JSON, informational only).

The format differs from the full model directory's (``"format": "ebranchformer"``, see
:mod:`ebranchformer.asr.model_dir`), so each loader rejects the other's directory with a clear error;
:func:`read_dir_format` tells them apart.

Example:
    >>> import tempfile, torch
    >>> from ebranchformer import ConformerEncoder
    >>> enc = ConformerEncoder(in_dim=16, out_dim=16, num_layers=1).eval()
    >>> path = save_encoder(enc, tempfile.mkdtemp() + "/enc")
    >>> again = load_encoder(path)
    >>> x, n = torch.randn(2, 9, 16), torch.tensor([9, 5])
    >>> bool(torch.equal(again(x, n)[0], enc(x, n)[0]))
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..asr.atomic import atomic_directory
from ..asr.model_dir import load_weights, save_weights
from ..nn.encoder import ConformerEncoder, EncoderConfig

__all__ = [
    "CONFIG_NAME",
    "ENCODER_FORMAT",
    "ENCODER_VERSION",
    "WEIGHTS_NAME",
    "EncoderDirError",
    "load_encoder",
    "read_dir_format",
    "read_encoder_config",
    "save_encoder",
]

ENCODER_FORMAT = "ebranchformer-encoder"
ENCODER_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class EncoderDirError(ValueError):
    """An encoder directory (or one of its files) is missing, malformed or inconsistent."""


def _library_version() -> str:
    from .. import __version__

    return __version__


def read_dir_format(path: str | os.PathLike) -> str | None:
    """The ``"format"`` in ``path/config.json`` (``"ebranchformer"`` for a full model directory,
    ``"ebranchformer-encoder"`` for an encoder-only one), or None when there is no readable config."""
    try:
        doc = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc.get("format") if isinstance(doc, dict) else None


def save_encoder(
    enc: ConformerEncoder, path: str | os.PathLike, *, source: dict[str, Any] | None = None
) -> Path:
    """Write ``enc`` as an encoder-only directory at ``path``, atomically (complete or absent). Returns the path.

    ``source`` is stored verbatim under ``"source"`` (JSON-able). An existing ``path`` is replaced only if it is
    empty or an encoder directory; anything else raises :class:`EncoderDirError` and is left alone.
    """
    if not isinstance(enc, ConformerEncoder):
        raise TypeError(f"enc must be a ConformerEncoder, got {type(enc).__name__}")
    path = Path(path)
    occupied = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if occupied and read_dir_format(path) != ENCODER_FORMAT:
        raise EncoderDirError(
            f"cannot save an encoder to {str(path)!r}: it exists and is not an encoder directory"
        )
    doc = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_VERSION,
        "encoder": enc.config.to_dict(),  # raises TypeError for a config holding live modules
        "files": {"weights": WEIGHTS_NAME},
        "source": source or {},
        "library_version": _library_version(),
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    with atomic_directory(path) as tmp:
        save_weights(enc.state_dict(), tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
    return path


def read_encoder_config(path: str | os.PathLike) -> tuple[EncoderConfig, dict[str, Any]]:
    """The :class:`EncoderConfig` and the whole parsed ``config.json`` of the encoder directory ``path``."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise EncoderDirError(f"{str(cfg_path)!r} is missing: {str(path)!r} is not an encoder directory")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EncoderDirError(f"{str(cfg_path)!r} is not readable JSON: {e}") from e
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != ENCODER_FORMAT:
        hint = (
            " (a full model directory: use ebranchformer.asr.model_dir.load_model)"
            if fmt == "ebranchformer"
            else ""
        )
        raise EncoderDirError(f"{str(cfg_path)!r} is not an {ENCODER_FORMAT} config (format={fmt!r}){hint}")
    if doc.get("version") != ENCODER_VERSION:
        raise EncoderDirError(
            f"{str(cfg_path)!r} has schema version {doc.get('version')!r}; this library reads {ENCODER_VERSION}"
        )
    if not isinstance(doc.get("encoder"), dict):
        raise EncoderDirError(f"{str(cfg_path)!r} needs a JSON object under 'encoder'")
    try:
        cfg = EncoderConfig.from_dict(doc["encoder"])
    except (TypeError, ValueError) as e:
        raise EncoderDirError(f"{str(cfg_path)!r} holds an invalid encoder config: {e}") from e
    return cfg, doc


def load_encoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ConformerEncoder:
    """Read an encoder directory written by :func:`save_encoder`; the encoder comes back in eval mode.

    Raises a ValueError naming the file at fault: :class:`EncoderDirError` for a missing or malformed
    ``config.json``, another format (e.g. a full model directory), weights whose names, shapes or dtypes do
    not fit the config; :class:`~ebranchformer.asr.model_dir.ModelDirError` for a missing or corrupt weights
    file.
    """
    path = Path(path)
    if not path.is_dir():
        raise EncoderDirError(f"encoder directory {str(path)!r} does not exist or is not a directory")
    cfg, _ = read_encoder_config(path)
    weights = path / WEIGHTS_NAME
    state = load_weights(weights)  # ModelDirError (a ValueError) naming the file when missing or damaged
    enc = ConformerEncoder.from_config(cfg)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        enc = enc.to(dtypes.pop())
    expected = enc.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [
        f"{k}: {state[k].dtype} {tuple(state[k].shape)}, expected {v.dtype} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype)
    ]
    if missing or unexpected or bad:
        raise EncoderDirError(
            f"{str(weights)!r} does not fit config.json: missing {missing}, unexpected {unexpected}, mismatched {bad}"
        )
    enc.load_state_dict(state, strict=True)
    return enc.to(map_location).eval()
