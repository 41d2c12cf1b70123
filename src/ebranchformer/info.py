"""Model facts for ``ebranchformer info``: parameters per module, output frame rate, GFLOPs of one forward.

:func:`model_info` takes a model directory, an encoder-only directory, or a YAML config (a ``TrainConfig``
with a ``model:`` section, or a ``ModelConfig`` itself) and returns a :class:`ModelInfo`:

* parameters per module: the frontend's input layer, each encoder layer, the other encoder parts, the CTC
  head (the rows add up to the total);
* the output frame rate: feature frames per second (sample rate / hop) divided by the subsampling;
* GFLOPs of one forward pass (eval mode) over one utterance of ``seconds`` seconds, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` on a real forward with random input (matmuls,
  convolutions and attention; elementwise work is not counted). One multiply-add is 2 FLOPs.

Example:
    >>> info = model_info("runs/demo/model", seconds=10.0)  # doctest: +SKIP
    >>> print(info.format())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelInfo", "count_flops", "model_info", "parameter_table"]

_STAND_IN_VOCAB = 32


@dataclasses.dataclass
class ModelInfo:
    """What :func:`model_info` found.

    Attributes:
        source: the path given and what it was (``"model directory"``, ...).
        rows: (module name, parameters) per module; they add up to ``total``.
        total: all parameters.
        feature_rate: feature frames per second (None for an encoder without a waveform frontend).
        subsampling: encoder input frames per output frame.
        output_rate: encoder output frames per second (None without a feature rate).
        seconds: the utterance length of the FLOP count.
        gflops: GFLOPs of one forward pass over ``seconds`` seconds (``gflops_encoder`` of the encoder alone).
        notes: remarks (e.g. a stand-in vocabulary size).
    """

    source: str
    rows: list[tuple[str, int]]
    total: int
    feature_rate: float | None
    subsampling: float
    output_rate: float | None
    seconds: float
    gflops: float
    gflops_encoder: float
    notes: list[str] = dataclasses.field(default_factory=list)

    def format(self) -> str:
        """A plain-text report with the parameter table."""
        width = max(len(n) for n, _ in self.rows + [("module", 0)])
        lines = [f"{self.source}", "", f"{'module':<{width}}  {'parameters':>12}  {'share':>6}"]
        for name, n in self.rows:
            lines.append(f"{name:<{width}}  {n:>12,}  {100 * n / max(self.total, 1):5.1f}%")
        lines.append(f"{'total':<{width}}  {self.total:>12,}  100.0%")
        lines.append("")
        if self.output_rate is not None:
            lines.append(f"output frame rate: {self.output_rate:.2f} frames/s ({self.feature_rate:g} feature "
                         f"frames/s, subsampling x{self.subsampling:g})")
        else:
            lines.append(f"subsampling: x{self.subsampling:g} (encoder input frames per output frame)")
        lines.append(f"forward GFLOPs for one {self.seconds:g} s utterance: {self.gflops:.3f} "
                     f"(encoder {self.gflops_encoder:.3f})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parameter_table(model: nn.Module) -> list[tuple[str, int]]:
    """(name, parameters) rows: the encoder's parts with each layer on its own row, then the other modules.

    Works for a :class:`~ebranchformer.asr.ctc_model.CTCModel` (names start with ``encoder.``) and a bare
    :class:`~ebranchformer.nn.ConformerEncoder`; the rows add up to all parameters (parameters held directly
    by a parent module get an ``(own)`` row).
    """
    rows: list[tuple[str, int]] = []

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    def walk(m: nn.Module, prefix: str, expand: bool) -> None:
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if own:
            rows.append((f"{prefix}(own)" if prefix else "(own)", own))
        for name, child in m.named_children():
            full = f"{prefix}{name}"
            n = count(child)
            if n == 0:
                continue
            if isinstance(child, nn.ModuleList):
                for i, layer in enumerate(child):
                    rows.append((f"{full}.{i}", count(layer)))
            elif expand and _is_encoder(child):
                walk(child, full + ".", expand=False)
            else:
                rows.append((full, n))

    if _is_encoder(model):
        walk(model, "encoder.", expand=False)
    else:
        walk(model, "", expand=True)
    return rows


def _is_encoder(m: nn.Module) -> bool:
    from ebranchformer.nn.encoder import ConformerEncoder

    return isinstance(m, ConformerEncoder)


def count_flops(fn, *args: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn(*args)`` by :class:`~torch.utils.flop_counter.FlopCounterMode`: (total, per module)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    per_module = {name: sum(d.values()) for name, d in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    from .config import load_yaml

    try:
        doc = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {str(path)!r} as YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{str(path)!r} must hold a YAML mapping (a TrainConfig or a ModelConfig)")
    return doc


def _model_config_from_yaml(path: Path, vocab_size: int | None, notes: list[str]):
    from ebranchformer.asr.model_config import ModelConfig
    from ebranchformer.asr.train_config import TrainConfig

    doc = _read_yaml(path)
    try:
        if "output_dir" in doc or "data" in doc or "optim" in doc:
            cfg = TrainConfig.from_dict(doc).model
            what = "training config"
        else:
            cfg = ModelConfig.from_dict(doc)
            what = "model config"
    except (TypeError, ValueError) as e:
        raise type(e)(f"{str(path)!r}: {e}") from e
    if vocab_size is not None:
        if cfg.vocab_size not in (None, vocab_size):
            raise ValueError(f"--vocab-size {vocab_size} disagrees with the config's vocab_size {cfg.vocab_size}")
        cfg = cfg.replace(vocab_size=vocab_size)
    elif cfg.vocab_size is None:
        cfg = cfg.replace(vocab_size=_STAND_IN_VOCAB)
        notes.append(f"the config leaves the vocabulary size to the tokenizer; counted with "
                     f"{_STAND_IN_VOCAB} tokens (set --vocab-size)")
    return cfg, what


def model_info(path: str | os.PathLike, seconds: float = 10.0, vocab_size: int | None = None) -> ModelInfo:
    """Parameters, frame rate and forward GFLOPs of the model at ``path`` (see the module doc).

    Args:
        path: a model directory (``config.json`` of format "ebranchformer"), an encoder directory (format
            "ebranchformer-encoder") or a YAML config (TrainConfig or ModelConfig).
        seconds: utterance length for the GFLOPs (> 0). Default 10.
        vocab_size: the CTC vocabulary size for a config without one (default: a stand-in of 32, noted).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 3600:
        raise ValueError(f"seconds must be a number in (0, 3600), got {seconds!r}")
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        fmt = _dir_format(path)
        if fmt == "ebranchformer-encoder":
            from ebranchformer.interop.encoder_dir import read_encoder_config
            from ebranchformer.nn.encoder import ConformerEncoder

            enc_cfg, _ = read_encoder_config(path)
            return _encoder_info(ConformerEncoder.from_config(enc_cfg).eval(), f"{path} (encoder directory)",
                                 seconds, notes)
        from ebranchformer.asr.model_dir import read_config

        cfg, _ = read_config(path)
        what = "model directory"
    elif path.is_file():
        cfg, what = _model_config_from_yaml(path, vocab_size, notes)
    else:
        raise ValueError(f"{str(path)!r} is neither a model directory nor a config file")
    from ebranchformer.asr.ctc_model import CTCModel

    torch.manual_seed(0)
    model = CTCModel(cfg).eval()  # random weights: counts and FLOPs do not depend on them
    rows = parameter_table(model)
    total = sum(p.numel() for p in model.parameters())
    enc = model.encoder
    if model.frontend is None:
        return _encoder_info(enc, f"{path} ({what}, no waveform frontend)", seconds, notes,
                             rows=rows, total=total, model=model)
    fc = cfg.features
    feature_rate = fc.sample_rate / fc.hop_length
    sub = _subsampling(enc)
    samples = max(int(round(seconds * fc.sample_rate)), model.min_num_samples())
    wav = torch.randn(1, samples) * 0.1
    lengths = torch.tensor([samples])
    flops, per_module = count_flops(model.log_probs, wav, lengths)
    enc_flops = _encoder_flops(per_module, flops)
    return ModelInfo(f"{path} ({what})", rows, total, feature_rate, sub, feature_rate / sub, float(seconds),
                     flops / 1e9, enc_flops / 1e9, notes)


def _dir_format(path: Path) -> str | None:
    try:
        doc = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc.get("format") if isinstance(doc, dict) else None


def _subsampling(enc: nn.Module) -> float:
    n = 100_000
    out = int(enc.output_lengths(torch.tensor([n]))[0])
    ratio = n / out
    return float(round(ratio)) if abs(ratio - round(ratio)) < 1e-2 else ratio


def _encoder_flops(per_module: dict[str, int], total: int) -> int:
    for key in ("CTCModel.encoder", "ConformerEncoder"):
        if key in per_module:
            return per_module[key]
    enc = [v for k, v in per_module.items() if k.endswith(".encoder") and k.count(".") == 1]
    return enc[0] if enc else total


def _encoder_info(enc, source: str, seconds: float, notes: list[str], rows=None, total=None,
                  model=None) -> ModelInfo:
    """Info for an encoder fed with features: assumes 100 feature frames per second for the FLOPs."""
    rows = rows if rows is not None else parameter_table(enc)
    total = total if total is not None else sum(p.numel() for p in enc.parameters())
    feature_rate = 100.0
    notes.append("no waveform frontend: the GFLOPs assume 100 feature frames per second (10 ms hop)")
    frames = max(int(round(seconds * feature_rate)), getattr(enc.input_layer, "min_length", 1))
    x = torch.randn(1, frames, enc.config.in_dim)
    lengths = torch.tensor([frames])
    if model is not None:
        flops, per_module = count_flops(model.log_probs_features, x, lengths)
        enc_flops = _encoder_flops(per_module, flops)
    else:
        flops, _ = count_flops(enc, x, lengths)
        enc_flops = flops
    sub = _subsampling(enc)
    return ModelInfo(source, rows, total, None, sub, None, float(seconds), flops / 1e9, enc_flops / 1e9, notes)
