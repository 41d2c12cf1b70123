"""Export a model (or its encoder) to ONNX or to a ``torch.export`` program, with dynamic batch and time.

Parts (``part=``):

- ``"encoder"``: inputs ``x`` float32 (B, T, F) and ``lengths`` int64 (B,); outputs ``y`` float32 (B, T', D) and
  ``y_lengths`` int64 (B,). For a :class:`~ebranchformer.asr.ctc_model.CTCModel` ``x`` is the raw log-mel
  features and the graph includes the model's GlobalMVN normalization (it is ``CTCModel.encode_features``);
  for a bare encoder (an encoder-only directory, a :class:`~ebranchformer.nn.ConformerEncoder`) ``x`` is the
  encoder input itself.
- ``"ctc"`` (CTC models only): the same inputs; outputs ``log_probs`` float32 (B, T', V) (log-softmax over
  the vocabulary, blank = 0) and ``log_probs_lengths`` int64 (B,). The graph is GlobalMVN + encoder + CTC
  head + log_softmax (``CTCModel.log_probs_features``), so a runtime only computes the log-mel features (the
  ``feature_config`` metadata says how; :mod:`ebranchformer.asr.onnx_runtime` does it in numpy).

(Output lengths are named ``*_lengths`` because an ONNX graph cannot reuse the input name ``lengths``.) Frames
``t >= lengths[b]`` of the outputs are padding. Exported graphs always use the batch-invariant ``"masked"``
padding: a model with ``padding="espnet_legacy"`` is switched (with a warning), so a padded row gives what it
gives alone, as in ESPnet's one-utterance-at-a-time inference.

Formats (``format=``):

- ``"onnx"``: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with dynamic ``batch``/``time``
  axes, saved as one ``.onnx`` file. The encoder runs its plain path (``set_fast_path(False)``): the fused
  ``scaled_dot_product_attention`` fast path fails in the exporter's decomposition for dynamic shapes (torch
  2.13: "Cannot view a tensor with shape [B, T', H, dk] ... as a tensor with shape (B, T', D)" at the reshape
  after SDPA); the plain path computes the same (see ``tests/nn/test_fast_paths.py``).
- ``"torch-export"``: a ``torch.export`` program (``.pt2``, the encoder's fast path kept), reloaded with
  ``torch.export.load`` or :func:`load_torch_export`; the oneDNN Linear layers (a custom op of this package) are
  switched to ``F.linear`` for both formats. Time is exported as ``Dim.DYNAMIC``: an explicit
  ``Dim("time", min=...)`` fails on the guards that exclude 1- and 2-frame encoder outputs, so the program
  accepts T from ``min_input_frames`` up (probed after export; 15 for conv2d x4: at least 3 output frames),
  and its input guards reject shorter inputs. The ONNX graph has no such guards (``min_input_frames`` is the
  frontend's minimum, 7 for conv2d x4, checked under onnxruntime when ``check=True``).

Metadata (string key -> string value) goes into the ONNX ``metadata_props`` and, for ``torch-export``, into
the archive's extra file ``ebranchformer_metadata.json`` (a JSON object with the same keys); see
:func:`export_metadata`. Keys: ``format`` ("ebranchformer-export"), ``version``, ``part``, ``inputs``,
``outputs``, ``normalization_in_graph``, ``feature_dim``, ``feature_config`` (FeatureConfig JSON or
"null"), ``sample_rate``, ``feature_frame_shift`` (seconds), ``subsampling_factor``, ``frame_shift``
(seconds per output frame), ``min_input_frames``, ``vocab_size``, ``vocabulary`` (JSON token list or "null"),
``tokenizer`` (JSON: text_kind, space_symbol, bpemodel_base64; or "null"), ``blank_id``, ``padding``,
``model_config``, ``library_version``. Numbers are written as decimal strings, "" when unknown.

The file is written atomically (a temporary file renamed over ``out_file``); with ``check=True`` (Default) the
exported artifact is first run on a second batch shape and compared with eager PyTorch, and nothing is written
when they disagree (as when the exporter fails). :func:`default_export_name` gives the conventional file names inside a model directory
(``model.ctc.onnx``, ``model.encoder.onnx``, ``model.ctc.pt2``, ...), where
:func:`ebranchformer.asr.onnx_runtime.transcribe_onnx` looks for ``model.ctc.onnx``.

Example:
    >>> export_model("models/ls100_ebf", "models/ls100_ebf/model.ctc.onnx", part="ctc")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..asr.atomic import atomic_write
from ..nn.encoder import ConformerEncoder, switch_flags
from .encoder_dir import ENCODER_FORMAT, load_encoder, read_dir_format

__all__ = [
    "FORMATS",
    "METADATA_FILE",
    "PARTS",
    "default_export_name",
    "export_metadata",
    "export_model",
    "load_torch_export",
]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torch-export")
PARTS = ("encoder", "ctc")
METADATA_FILE = "ebranchformer_metadata.json"
EXPORT_FORMAT = "ebranchformer-export"
EXPORT_VERSION = 1
_IO_NAMES = {
    "encoder": (["x", "lengths"], ["y", "y_lengths"]),
    "ctc": (["x", "lengths"], ["log_probs", "log_probs_lengths"]),
}
_SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}


def default_export_name(format: str = "onnx", part: str = "ctc") -> str:
    """The conventional file name of an export inside a model directory, e.g. ``model.ctc.onnx``."""
    _check_choice("format", format, FORMATS)
    _check_choice("part", part, PARTS)
    return f"model.{part}{_SUFFIX[format]}"


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class _EncoderPart(nn.Module):
    """(x, lengths) -> (y, y_lengths): normalization + encoder of a CTCModel, or a bare encoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.model, ConformerEncoder):
            return self.model(x, lengths)
        return self.model.encode_features(x, lengths)


class _CTCPart(nn.Module):
    """(x, lengths) -> (log_probs, log_probs_lengths) of a CTCModel."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.log_probs_features(x, lengths)


def _load(model_dir_or_model: Any) -> nn.Module:
    from ..asr.ctc_model import CTCModel

    if isinstance(model_dir_or_model, (CTCModel, ConformerEncoder)):
        return model_dir_or_model
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        raise TypeError(
            "model_dir_or_model must be a CTCModel, a ConformerEncoder or a model directory path, got "
            f"{type(model_dir_or_model).__name__}"
        )
    path = Path(model_dir_or_model)
    fmt = read_dir_format(path)
    if fmt == ENCODER_FORMAT:
        return load_encoder(path)
    if fmt == "ebranchformer":
        return CTCModel.load(path)
    raise ValueError(
        f"model_dir_or_model {os.fspath(path)!r} is not a model directory (config.json with format "
        f"'ebranchformer' or {ENCODER_FORMAT!r}); got format {fmt!r}"
    )


def _encoder_of(model: nn.Module) -> ConformerEncoder:
    return model if isinstance(model, ConformerEncoder) else model.encoder


def _prepared(model: nn.Module, fast: bool) -> nn.Module:
    """A float32 eval-mode copy with masked padding and the requested fast path."""
    model = copy.deepcopy(model).float().eval()
    enc = _encoder_of(model)
    if enc.config.padding != "masked":
        logger.warning(
            "export: the encoder's padding %r is switched to 'masked' (batch-invariant) in the exported graph",
            enc.config.padding,
        )
        enc.config = dataclasses.replace(enc.config, padding="masked")
    enc.set_fast_path(fast)
    # CPU block loops depend on T and the row groups run in threads (one graph needs one pass); the oneDNN custom op
    # is not an ONNX operator. The whole model: the CTC head's Linear too.
    switch_flags(model, ("chunked", "onednn", "split_rows"), False)
    return model


def _subsampling_factor(enc: ConformerEncoder) -> int:
    n = 1_000_000
    out = int(enc.output_lengths(torch.tensor([n]))[0])
    return max(1, round(n / out))


def _tokenizer_metadata(tokenizer: Any) -> dict[str, Any] | None:
    """text_kind, space_symbol and the sentencepiece model (base64) of a TokenListTokenizer-like tokenizer."""
    if tokenizer is None:
        return None
    meta: dict[str, Any] = {
        "text_kind": getattr(tokenizer, "text_kind", "char"),
        "space_symbol": getattr(tokenizer, "space_symbol", "<space>"),
        "bpemodel_base64": None,
    }
    if meta["text_kind"] == "bpe":
        with tempfile.TemporaryDirectory() as tmp:
            saved = json.loads(Path(tokenizer.save(tmp)).read_text(encoding="utf-8"))
            model_file = saved.get("model")
            if model_file is None:
                raise ValueError("a bpe tokenizer without a sentencepiece model cannot be exported")
            meta["bpemodel_base64"] = base64.b64encode((Path(tmp) / model_file).read_bytes()).decode("ascii")
    return meta


def export_metadata(model: nn.Module, part: str) -> dict[str, str]:
    """The metadata embedded in an export of ``part`` of ``model`` (a CTCModel or a ConformerEncoder)."""
    _check_choice("part", part, PARTS)
    enc = _encoder_of(model)
    is_encoder = isinstance(model, ConformerEncoder)
    fc = None if is_encoder else model.config.features
    factor = _subsampling_factor(enc)
    tokenizer = None if is_encoder else model.tokenizer
    inputs, outputs = _IO_NAMES[part]
    has_norm = not is_encoder and model.normalize is not None
    x_doc = "log-mel features (raw, normalized in the graph)" if has_norm else "encoder input features"
    out_doc = "float32 (B, T', D)" if part == "encoder" else "float32 (B, T', V) log-softmax"
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "part": part,
        "inputs": json.dumps({inputs[0]: f"float32 (B, T, F): {x_doc}", inputs[1]: "int64 (B,)"}),
        "outputs": json.dumps({outputs[0]: out_doc, outputs[1]: "int64 (B,)"}),
        "normalization_in_graph": "true" if has_norm else "false",
        "feature_dim": enc.config.in_dim,
        "feature_config": json.dumps(fc.to_dict() if fc is not None else None),
        "sample_rate": fc.sample_rate if fc is not None else "",
        "feature_frame_shift": fc.hop_length / fc.sample_rate if fc is not None else "",
        "subsampling_factor": factor,
        "frame_shift": factor * fc.hop_length / fc.sample_rate if fc is not None else "",
        "min_input_frames": int(getattr(enc.input_layer, "min_length", 1) or 1),
        "vocab_size": "" if is_encoder else model.config.vocab_size,
        "vocabulary": json.dumps(tokenizer.tokens if tokenizer is not None else None, ensure_ascii=False),
        "tokenizer": json.dumps(_tokenizer_metadata(tokenizer)),
        "blank_id": "" if is_encoder else 0,
        "padding": "masked",
        "model_config": json.dumps((enc.config if is_encoder else model.config).to_dict()),
        "library_version": _library_version(),
    }
    return {k: str(v) for k, v in meta.items()}


def _library_version() -> str:
    from .. import __version__

    return __version__


def _example(enc: ConformerEncoder, batch: int, time: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo = max(int(getattr(enc.input_layer, "min_length", 1) or 1), 1)
    x = torch.randn(batch, time, enc.config.in_dim, generator=g)
    lengths = torch.randint(lo, time + 1, (batch,), generator=g)
    lengths[0] = time
    return x, lengths


def _dynamic_shapes() -> tuple[dict[int, Any], dict[int, Any]]:
    """Batch from 1 up; time fully dynamic: ``torch.export`` works out the shortest time the graph supports (an
    explicit ``Dim("time", min=...)`` trips over the guards that rule out 1- and 2-frame encoder outputs)."""
    batch = torch.export.Dim("batch", min=1)
    return ({0: batch, 1: torch.export.Dim.DYNAMIC}, {0: batch})


def _min_frames(run: Any, enc: ConformerEncoder) -> int:
    """The shortest input (frames) the exported program accepts: probed upwards from the encoder's minimum."""
    lo = max(int(getattr(enc.input_layer, "min_length", 1) or 1), 1)
    for t in range(lo, lo + 256):
        try:
            run(torch.zeros(1, t, enc.config.in_dim), torch.tensor([t]))
            return t
        except Exception:  # noqa: BLE001, S112  (a failed input guard: the error type varies by torch version)
            continue
    raise RuntimeError(f"the exported program rejects every input of {lo} to {lo + 255} frames")


def _compare(got: list, ref: tuple[torch.Tensor, torch.Tensor], what: str, atol: float = 1e-3) -> None:
    y, n = (torch.as_tensor(v) for v in got)
    y_ref, n_ref = ref
    if not torch.equal(n.long(), n_ref.long()):
        raise RuntimeError(f"{what}: exported lengths {n.tolist()} differ from PyTorch's {n_ref.tolist()}")
    for b in range(y.shape[0]):
        diff = float((y[b, : n[b]] - y_ref[b, : n[b]]).abs().max()) if int(n[b]) else 0.0
        if not diff <= atol:
            raise RuntimeError(
                f"{what}: exported output differs from PyTorch by {diff:.3g} (> {atol}) in row {b}"
            )


def export_model(
    model_dir_or_model: Any,
    out_file: str | os.PathLike,
    *,
    format: str = "onnx",
    part: str = "encoder",
    check: bool = True,
    optimize: bool = True,
) -> Path:
    """Export ``part`` of a model to ``out_file`` (see the module doc). Returns ``Path(out_file)``.

    Args:
        model_dir_or_model: a model directory (full or encoder-only), a CTCModel or a ConformerEncoder. The
            model is copied; the caller's object is not changed.
        out_file: the file to write (its folder must exist); replaced atomically.
        format: ``"onnx"`` (Default) or ``"torch-export"``.
        part: ``"encoder"`` (Default) or ``"ctc"``.
        check: run the exported file on another (B, T) shape and compare with PyTorch before writing it.
        optimize: ONNX only: let the exporter optimize the graph (constant folding, fusions). Default True;
            False exports about twice as fast.

    Raises:
        ValueError / TypeError naming the argument (unknown format/part, ``part="ctc"`` of an encoder-only model,
        a missing folder); RuntimeError when the exporter fails or the check finds a mismatch. Nothing is
        written at ``out_file`` then.
    """
    _check_choice("format", format, FORMATS)
    _check_choice("part", part, PARTS)
    if not isinstance(out_file, (str, os.PathLike)):
        raise TypeError(f"out_file must be a path, got {type(out_file).__name__}")
    out = Path(out_file)
    if not out.parent.is_dir():
        raise ValueError(f"out_file's folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise ValueError(f"out_file {str(out)!r} is a directory")
    model = _load(model_dir_or_model)
    if part == "ctc" and isinstance(model, ConformerEncoder):
        raise ValueError(
            "part='ctc' needs a CTC model; an encoder-only model has no CTC head (use part='encoder')"
        )
    model = _prepared(model, fast=format == "torch-export")
    wrapper = (_CTCPart if part == "ctc" else _EncoderPart)(model).eval()
    enc = _encoder_of(model)
    meta = export_metadata(model, part)
    args = _example(enc, 2, 64 * max(1, _subsampling_factor(enc)) // 2 + 17, seed=0)
    check_args = _example(enc, 3, 48 * max(1, _subsampling_factor(enc)) // 2 + 5, seed=1)
    with torch.no_grad():
        if format == "onnx":
            data = _export_onnx(wrapper, args, part, meta, optimize)
            if check:
                _check_onnx(data, wrapper, check_args, int(meta["min_input_frames"]))
        else:
            try:
                ep = torch.export.export(wrapper, args, dynamic_shapes=_dynamic_shapes(), strict=False)
            except Exception as e:  # the exporter's own error types vary across torch versions
                raise RuntimeError(f"torch.export of part={part!r} failed: {e}") from e
            run = ep.module()
            meta["min_input_frames"] = str(_min_frames(run, enc))
            if check:
                _compare(list(run(*check_args)), wrapper(*check_args), "torch.export program")
            extra = {METADATA_FILE: json.dumps(meta, ensure_ascii=False)}

            def data(f: Any) -> None:
                torch.export.save(ep, f, extra_files=extra)

    return atomic_write(out, data)


def _export_onnx(wrapper: nn.Module, args: tuple, part: str, meta: dict[str, str], optimize: bool) -> bytes:
    inputs, outputs = _IO_NAMES[part]
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="# The axis name"
        )  # batch is shared by both inputs: expected
        try:
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(),
                input_names=inputs,
                output_names=outputs,
                optimize=bool(optimize),
                verbose=False,
                external_data=False,
            )
        except Exception as e:  # the exporter's own error types vary across torch versions
            raise RuntimeError(f"ONNX export of part={part!r} failed: {e}") from e
    time = program.model.graph.inputs[0].shape[1]
    if not isinstance(time, int):
        program.rename_axes({time: "time"})  # the symbol torch.export picked (e.g. "s27"), in every shape
    program.model.metadata_props.update(meta)
    proto = program.model_proto
    if proto.ByteSize() >= 2**31:
        raise ValueError("the model is too large for a single-file ONNX export (>= 2 GiB)")
    return proto.SerializeToString()


def _check_onnx(data: bytes, wrapper: nn.Module, args: tuple, min_frames: int) -> None:
    """Run the ONNX model on ``args`` and on one utterance of ``min_frames`` frames; compare with PyTorch."""
    try:
        import onnxruntime as ort
    except ImportError:
        logger.warning("onnxruntime is not installed: the exported ONNX file is not checked")
        return
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    shortest = (torch.randn(1, min_frames, args[0].shape[2]), torch.tensor([min_frames]))
    for x, lengths in (args, shortest):
        got = session.run(None, {names[0]: x.numpy(), names[1]: lengths.numpy()})
        _compare(got, wrapper(x, lengths), f"ONNX model under onnxruntime, input {tuple(x.shape)}")


def load_torch_export(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """Reload a ``torch-export`` file: the program (call ``program.module()(x, lengths)``) and its metadata."""
    extra = {METADATA_FILE: ""}
    program = torch.export.load(os.fspath(path), extra_files=extra)
    try:
        meta = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)!r}: unreadable {METADATA_FILE}: {e}") from e
    return program, meta
