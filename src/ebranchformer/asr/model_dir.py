"""The model directory: a trained :class:`~ebranchformer.asr.ctc_model.CTCModel` on disk.

Layout (schema version 1)::

    model/
      config.json         {"format": "ebranchformer", "version": 1, "model": ModelConfig.to_dict(),
                           "files": {...}, "library_version": "..."}
      model.safetensors   every parameter and persistent buffer (normalization statistics included)
      feats_stats.npz     the normalization statistics in ESPnet's layout (count, sum, sum_square);
                          only when model.normalize is "global_mvn"
      tokenizer.json      the tokenizer (Tokenizer.save): tokens.txt, plus bpe.model for sentencepiece
      tokens.txt

``config.json`` ``"model"`` covers the frontend (``features``), the normalization (``normalize``),
SpecAugment, the encoder and the CTC head (``vocab_size``, ``ctc_*``). ``"files"`` names the other files
(``weights``, ``normalization_stats`` or null, ``tokenizer`` or null).

:func:`save_model` writes into a temporary directory next to the target and renames it into place when every
file is complete and synced, so a crash or an error never leaves a half-written model directory under the
target name (an existing one is replaced only once the new one is complete). :func:`load_model` checks
everything and raises :class:`ModelDirError` (a ValueError) naming the file at fault: a missing or unreadable
file, malformed JSON, another format, an unknown schema version, a corrupt safetensors file, weights whose
names or shapes do not match the config, statistics that disagree with the weights, a tokenizer of the wrong
size.

Example:
    >>> model.save("exp/model")  # doctest: +SKIP
    >>> model = load_model("exp/model")  # doctest: +SKIP
    >>> model.transcribe(["utt.wav"])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebranchformer.asr.atomic import atomic_directory
from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.global_mvn import GlobalMVN
from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.tokenizer import CONFIG_NAME as TOKENIZER_NAME
from ebranchformer.asr.tokenizer import Tokenizer

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "STATS_NAME",
    "VERSION",
    "WEIGHTS_NAME",
    "ModelDirError",
    "load_model",
    "load_weights",
    "read_config",
    "save_model",
    "save_weights",
]

FORMAT = "ebranchformer"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATS_NAME = "feats_stats.npz"


class ModelDirError(ValueError):
    """A model directory (or one of its files) is missing, malformed or inconsistent."""


def _library_version() -> str:
    from ebranchformer import __version__

    return __version__


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict to a safetensors file (CPU copies, contiguous, unshared). Not atomic by itself."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; raises :class:`ModelDirError` naming it when missing or corrupt."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"weights file {str(path)!r} is missing")
    try:
        return load_file(os.fspath(path), device=str(device))
    except Exception as e:  # safetensors raises SafetensorError, OSError, ... for damaged files
        raise ModelDirError(f"weights file {str(path)!r} is not a readable safetensors file: {e}") from e


def save_model(model: CTCModel, path: str | os.PathLike) -> Path:
    """Write ``model`` as a model directory at ``path`` (atomically; see the module doc). Returns the path.

    An existing ``path`` is replaced only if it is an empty directory or a model directory (it has a
    ``config.json`` of this format); anything else raises :class:`ModelDirError` and is left alone.
    """
    if not isinstance(model, CTCModel):
        raise TypeError(f"model must be a CTCModel, got {type(model).__name__}")
    path = Path(path)
    _check_replaceable(path)
    cfg = model.config
    files: dict[str, Any] = {"weights": WEIGHTS_NAME, "normalization_stats": None, "tokenizer": None}
    with atomic_directory(path) as tmp:
        save_weights(model.state_dict(), tmp / WEIGHTS_NAME)
        if model.normalize is not None:
            model.normalize.save_stats(tmp / STATS_NAME)
            files["normalization_stats"] = STATS_NAME
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
            files["tokenizer"] = TOKENIZER_NAME
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "model": cfg.to_dict(),
            "files": files,
            "library_version": _library_version(),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise ModelDirError(f"cannot save a model to {str(path)!r}: it exists and is not a directory")
    if not any(path.iterdir()):
        return
    try:
        read_config(path)
    except ModelDirError as e:
        raise ModelDirError(
            f"cannot save a model to {str(path)!r}: it exists and is not a model directory ({e})"
        ) from None


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The :class:`ModelConfig` and the whole parsed ``config.json`` of the model directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {str(path)!r} does not exist or is not a directory")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelDirError(f"{str(cfg_path)!r} is missing: {str(path)!r} is not a model directory")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{str(cfg_path)!r} is not readable JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise ModelDirError(f"{str(cfg_path)!r} is not an {FORMAT} model config (format={fmt!r})")
    if doc.get("version") != VERSION:
        raise ModelDirError(
            f"{str(cfg_path)!r} has schema version {doc.get('version')!r}; this library reads version "
            f"{VERSION} (library {_library_version()})"
        )
    files = doc.get("files")
    if not isinstance(files, dict) or not isinstance(doc.get("model"), dict):
        raise ModelDirError(f"{str(cfg_path)!r} needs JSON objects under 'model' and 'files'")
    try:
        cfg = ModelConfig.from_dict(doc["model"])
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{str(cfg_path)!r} holds an invalid model config: {e}") from e
    if cfg.vocab_size is None:
        raise ModelDirError(f"{str(cfg_path)!r}: model.vocab_size is missing")
    if files.get("weights") != WEIGHTS_NAME:
        raise ModelDirError(
            f"{str(cfg_path)!r}: files.weights must be {WEIGHTS_NAME!r}, got {files.get('weights')!r}"
        )
    for key, expected in (("normalization_stats", STATS_NAME), ("tokenizer", TOKENIZER_NAME)):
        if files.get(key) not in (None, expected):
            raise ModelDirError(
                f"{str(cfg_path)!r}: files.{key} must be {expected!r} or null, got {files.get(key)!r}"
            )
    if (files.get("normalization_stats") is None) != (cfg.normalize is None):
        raise ModelDirError(
            f"{str(cfg_path)!r}: files.normalization_stats must be set iff model.normalize is"
        )
    return cfg, doc


def _read_stats(path: Path) -> GlobalMVN:
    if not path.is_file():
        raise ModelDirError(f"normalization statistics file {str(path)!r} is missing")
    try:
        mvn = GlobalMVN.from_espnet_stats(path)
    except Exception as e:  # ValueError, BadZipFile, ... for damaged files
        raise ModelDirError(f"normalization statistics file {str(path)!r} is unreadable: {e}") from e
    if not isinstance(mvn, GlobalMVN):
        raise ModelDirError(f"normalization statistics file {str(path)!r} could not be read")
    return mvn


def _tokenizer_files(path: Path) -> str:
    """The tokenizer's file names, as ``tokenizer.json`` lists them (for error messages)."""
    names = [TOKENIZER_NAME]
    try:
        doc = json.loads((path / TOKENIZER_NAME).read_text(encoding="utf-8"))
        names += [doc[k] for k in ("tokens", "model") if isinstance(doc.get(k), str)]
    except (OSError, ValueError, AttributeError):
        pass
    return ", ".join(names)


def _read_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    try:
        tok = Tokenizer.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise ModelDirError(
            f"tokenizer files ({_tokenizer_files(path)}) in {str(path)!r} are missing or invalid: {e}"
        ) from e
    if tok.vocab_size != vocab_size:
        raise ModelDirError(
            f"tokenizer files ({_tokenizer_files(path)}) in {str(path)!r}: vocab_size {tok.vocab_size} != "
            f"model vocab_size {vocab_size}"
        )
    return tok


def _check_state(model: CTCModel, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        more_missing = "..." if len(missing) > 5 else ""
        more_unexpected = "..." if len(unexpected) > 5 else ""
        raise ModelDirError(
            f"{str(where)!r} does not match config.json: missing {missing[:5]}{more_missing}, "
            f"unexpected {unexpected[:5]}{more_unexpected}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
            raise ModelDirError(
                f"{str(where)!r}: tensor {k!r} is {state[k].dtype} {tuple(state[k].shape)}, "
                f"the config needs {v.dtype} {tuple(v.shape)}"
            )


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CTCModel:
    """Read a model directory written by :func:`save_model`; the model comes back in eval mode.

    Args:
        path: the model directory.
        map_location: device to put the model on. Default "cpu".

    Raises:
        ModelDirError (a ValueError) naming the file at fault (see the module doc).
    """
    path = Path(path)
    cfg, doc = read_config(path)
    files = doc["files"]
    normalizer = _read_stats(path / STATS_NAME) if files.get("normalization_stats") else None
    tokenizer = _read_tokenizer(path, cfg.vocab_size) if files.get("tokenizer") else None
    state = load_weights(path / WEIGHTS_NAME)
    model = CTCModel(cfg, tokenizer=tokenizer, normalizer=normalizer)
    _check_state(model, state, path / WEIGHTS_NAME)
    if normalizer is not None:
        _check_stats_agree(normalizer, state, path)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _check_stats_agree(stats: GlobalMVN, state: dict[str, torch.Tensor], path: Path) -> None:
    """The npz statistics must be those stored with the weights (checked before the weights are loaded)."""
    for name in ("count", "feat_sum", "feat_sum_square"):
        a = getattr(stats, name).cpu().numpy()
        b = state[f"normalize.{name}"].cpu().numpy()
        if not np.array_equal(a, b):
            raise ModelDirError(
                f"{str(path / STATS_NAME)!r} disagrees with {str(path / WEIGHTS_NAME)!r} ({name})"
            )
