"""``TrainConfig``: the full YAML of a training run (``ebranchformer train CONFIG.yaml``).

Sections ``data``, ``tokenizer``, ``model`` (a :class:`~ebranchformer.asr.model_config.ModelConfig`),
``optim``, ``checkpoint``, ``log`` and top-level run options. Every field is documented next to it; unknown
keys are rejected (ValueError naming them); omitted keys take the defaults shown. Relative paths are taken
relative to the current directory.

Example YAML::

    output_dir: exp/ebf_small
    seed: 0
    precision: fp32            # fp32 | bf16 | fp16
    data:
      train: data/train.jsonl
      valid: data/valid.jsonl
      max_frames: 20000        # padded feature frames per global batch
    tokenizer: {kind: char}
    model:
      encoder: {out_dim: 144, num_layers: 8, ...}
    optim: {name: adamw, lr: 0.002, scheduler: noam, warmup_steps: 2500, total_steps: 40000}
    checkpoint: {every_steps: 1000, keep_last: 3, average_best: 5, average_by: valid_loss}

Example:
    >>> cfg = TrainConfig.from_dict({"output_dir": "exp/x", "data": {"train": "train.jsonl"},
    ...                              "optim": {"total_steps": 100}})
    >>> cfg.optim.scheduler, cfg.checkpoint.keep_last
    ('noam', 3)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ebranchformer.asr.model_config import ModelConfig
from ebranchformer.asr.schedulers import SCHEDULES
from ebranchformer.config import ConfigBase, check, load_yaml

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LogConfig",
    "OptimConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_train_config",
]


def _is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """``data:`` the corpora and batching."""

    train: str = ""  # JSONL manifest of the training set (required)
    valid: str | None = None  # JSONL manifest of the validation set; None: no validation
    sample_rate: int = 16000  # audio is resampled to this rate (must equal model.features.sample_rate)
    max_frames: float = 20000.0  # padded feature frames per global batch (size x longest; 100/s at 10 ms)
    max_batch_size: int | None = None  # optional cap on utterances per global batch
    num_buckets: int = 10  # length buckets of the batch sampler
    num_workers: int = 0  # DataLoader worker processes per rank
    check_audio: bool = True  # skip manifest lines whose audio file is missing (one stat per line)

    def __post_init__(self) -> None:
        check(
            isinstance(self.train, str) and bool(self.train),
            f"data.train must be a manifest path, got {self.train!r}",
        )
        check(
            self.valid is None or (isinstance(self.valid, str) and bool(self.valid)),
            f"data.valid must be a manifest path or null, got {self.valid!r}",
        )
        check(
            _is_int(self.sample_rate, 1), f"data.sample_rate must be a positive int, got {self.sample_rate!r}"
        )
        check(
            _is_num(self.max_frames) and self.max_frames > 0,
            f"data.max_frames must be > 0, got {self.max_frames!r}",
        )
        object.__setattr__(self, "max_frames", float(self.max_frames))
        check(
            self.max_batch_size is None or _is_int(self.max_batch_size, 1),
            f"data.max_batch_size must be an int >= 1 or null, got {self.max_batch_size!r}",
        )
        check(_is_int(self.num_buckets, 1), f"data.num_buckets must be an int >= 1, got {self.num_buckets!r}")
        check(_is_int(self.num_workers, 0), f"data.num_workers must be an int >= 0, got {self.num_workers!r}")
        check(
            isinstance(self.check_audio, bool),
            f"data.check_audio must be a bool, got {self.check_audio!r}",
            TypeError,
        )


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(ConfigBase):
    """``tokenizer:`` how text becomes token ids (built from the training transcripts, or an existing one)."""

    kind: str = "char"  # "char" (one token per character) or "bpe" (sentencepiece trained on train texts)
    vocab_size: int | None = None  # sentencepiece vocabulary size (required for "bpe", unused for "char")
    model_type: str = "bpe"  # sentencepiece model type for "bpe": "bpe" or "unigram"
    dir: str | None = None  # an existing tokenizer directory (Tokenizer.save); overrides kind/vocab_size

    def __post_init__(self) -> None:
        check(self.kind in ("char", "bpe"), f"tokenizer.kind must be 'char' or 'bpe', got {self.kind!r}")
        check(
            self.model_type in ("bpe", "unigram"),
            f"tokenizer.model_type must be 'bpe' or 'unigram', got {self.model_type!r}",
        )
        check(
            self.dir is None or (isinstance(self.dir, str) and bool(self.dir)),
            f"tokenizer.dir must be a directory path or null, got {self.dir!r}",
        )
        if self.dir is None and self.kind == "bpe":
            check(
                _is_int(self.vocab_size, 4),
                f"tokenizer.vocab_size must be an int >= 4 for bpe, got {self.vocab_size!r}",
            )


@dataclasses.dataclass(frozen=True)
class OptimConfig(ConfigBase):
    """``optim:`` optimizer, learning-rate schedule, run length, gradient handling."""

    _tuple_fields = ("betas",)

    name: str = "adamw"  # "adam" or "adamw" (decoupled weight decay)
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # L2 (adam) or decoupled (adamw) weight decay
    scheduler: str = "noam"  # "noam" (ESPnet WarmupLR), "warmup_cosine" or "constant"
    warmup_steps: int = 1000  # updates of linear warm-up to the peak lr
    min_lr_ratio: float = 0.0  # warmup_cosine: final lr as a fraction of the peak
    total_steps: int | None = None  # stop after this many steps (each = accum_grad batches); or null
    max_epochs: int | None = None  # stop after this many epochs; or null (one of the two must be set)
    grad_clip: float = 5.0  # clip the global gradient norm to this; 0 disables clipping
    accum_grad: int = 1  # batches whose gradients are summed per step

    def __post_init__(self) -> None:
        check(self.name in ("adam", "adamw"), f"optim.name must be 'adam' or 'adamw', got {self.name!r}")
        check(_is_num(self.lr) and self.lr > 0, f"optim.lr must be > 0, got {self.lr!r}")
        b = self.betas
        check(
            isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b),
            f"optim.betas must be two numbers in [0, 1), got {b!r}",
        )
        object.__setattr__(self, "betas", (float(b[0]), float(b[1])))
        check(_is_num(self.eps) and self.eps > 0, f"optim.eps must be > 0, got {self.eps!r}")
        check(
            _is_num(self.weight_decay) and self.weight_decay >= 0,
            f"optim.weight_decay must be >= 0, got {self.weight_decay!r}",
        )
        check(
            self.scheduler in SCHEDULES, f"optim.scheduler must be one of {SCHEDULES}, got {self.scheduler!r}"
        )
        check(
            _is_int(self.warmup_steps, 1 if self.scheduler == "noam" else 0),
            f"optim.warmup_steps must be an int >= {1 if self.scheduler == 'noam' else 0}, "
            f"got {self.warmup_steps!r}",
        )
        check(
            _is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}",
        )
        check(
            self.total_steps is None or _is_int(self.total_steps, 1),
            f"optim.total_steps must be an int >= 1 or null, got {self.total_steps!r}",
        )
        check(
            self.max_epochs is None or _is_int(self.max_epochs, 1),
            f"optim.max_epochs must be an int >= 1 or null, got {self.max_epochs!r}",
        )
        check(
            self.total_steps is not None or self.max_epochs is not None,
            "optim needs total_steps or max_epochs (or both: whichever comes first)",
        )
        check(
            self.scheduler != "warmup_cosine" or self.total_steps is None or self.total_steps > self.warmup_steps,
            f"optim.scheduler warmup_cosine needs total_steps > warmup_steps ({self.warmup_steps}), got "
            f"total_steps={self.total_steps}",
        )
        check(
            _is_num(self.grad_clip) and self.grad_clip >= 0,
            f"optim.grad_clip must be >= 0, got {self.grad_clip!r}",
        )
        check(_is_int(self.accum_grad, 1), f"optim.accum_grad must be an int >= 1, got {self.accum_grad!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(ConfigBase):
    """``checkpoint:`` periodic checkpoints (with validation), retention, resuming, the final average."""

    every_steps: int = 1000  # validate and write a checkpoint every this many steps (and at the end)
    keep_last: int = 3  # keep the newest K checkpoints (plus the best ones needed for averaging)
    average_best: int = 5  # final model = average of the best N checkpoints; 0: the last weights as they are
    average_by: str = "valid_loss"  # "valid_loss", "wer" or "cer"; without valid data: the last N
    resume: bool = True  # continue from the newest complete checkpoint in output_dir, if any

    def __post_init__(self) -> None:
        check(
            _is_int(self.every_steps, 1),
            f"checkpoint.every_steps must be an int >= 1, got {self.every_steps!r}",
        )
        check(_is_int(self.keep_last, 1), f"checkpoint.keep_last must be an int >= 1, got {self.keep_last!r}")
        check(
            _is_int(self.average_best, 0),
            f"checkpoint.average_best must be an int >= 0, got {self.average_best!r}",
        )
        check(
            self.average_by in ("valid_loss", "wer", "cer"),
            f"checkpoint.average_by must be 'valid_loss', 'wer' or 'cer', got {self.average_by!r}",
        )
        check(
            isinstance(self.resume, bool), f"checkpoint.resume must be a bool, got {self.resume!r}", TypeError
        )


@dataclasses.dataclass(frozen=True)
class LogConfig(ConfigBase):
    """``log:`` reporting (rank 0 only)."""

    every_steps: int = 50  # write a metrics.jsonl record (means since the last one) every this many steps
    progress_bar: bool = True  # tqdm bar with loss, lr and frames/s
    plot: bool = True  # write learning_curves.png at every checkpoint and at the end

    def __post_init__(self) -> None:
        check(_is_int(self.every_steps, 1), f"log.every_steps must be an int >= 1, got {self.every_steps!r}")
        for name in ("progress_bar", "plot"):
            check(isinstance(getattr(self, name), bool), f"log.{name} must be a bool", TypeError)


def _default_optim() -> OptimConfig:
    return OptimConfig(total_steps=10000)


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """A whole training run: ``TrainConfig.from_yaml(text)`` or :func:`load_train_config` (path)."""

    output_dir: str = ""  # where checkpoints, logs, the tokenizer and the final model directory go (required)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # see DataConfig
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)  # see TokenizerConfig
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # vocab_size comes from the tokenizer
    optim: OptimConfig = dataclasses.field(default_factory=_default_optim)  # see OptimConfig
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)  # see CheckpointConfig
    log: LogConfig = dataclasses.field(default_factory=LogConfig)  # see LogConfig
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler)
    seed: int = 0  # seeds python, numpy and torch (rank r uses seed + r) and the data order
    deterministic: bool = False  # deterministic kernels (use_deterministic_algorithms), exact resumes
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK when CUDA is present, else cpu), "cpu" or "cuda"

    def __post_init__(self) -> None:
        check(
            isinstance(self.output_dir, str) and bool(self.output_dir),
            f"output_dir must be a directory path, got {self.output_dir!r}",
        )
        for name, cls in (
            ("data", DataConfig),
            ("tokenizer", TokenizerConfig),
            ("model", ModelConfig),
            ("optim", OptimConfig),
            ("checkpoint", CheckpointConfig),
            ("log", LogConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls.from_dict(value))
            check(
                isinstance(getattr(self, name), cls),
                f"{name} must be a {cls.__name__} or its dict",
                TypeError,
            )
        check(
            self.precision in ("fp32", "bf16", "fp16"),
            f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}",
        )
        check(_is_int(self.seed, 0), f"seed must be an int >= 0, got {self.seed!r}")
        check(
            isinstance(self.deterministic, bool),
            f"deterministic must be a bool, got {self.deterministic!r}",
            TypeError,
        )
        check(
            self.device in ("auto", "cpu", "cuda"),
            f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}",
        )
        feats = self.model.features
        check(feats is not None, "model.features must be set for training from audio (a waveform frontend)")
        check(
            feats.sample_rate == self.data.sample_rate,
            f"data.sample_rate ({self.data.sample_rate}) must equal model.features.sample_rate "
            f"({feats.sample_rate})",
        )


def _apply_override(doc: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=VALUE`` (VALUE parsed as YAML) in the nested dict ``doc``."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"override must look like section.field=value, got {item!r}")
    node = doc
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(  # noqa: TRY004 (bad file content)
                f"override {item!r}: {p!r} is not a section"
            )
        node = child
    node[parts[-1]] = load_yaml(raw)


def load_train_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a :class:`TrainConfig` from a YAML file; errors name the file.

    ``overrides``: items ``"section.field=value"`` (value parsed as YAML) applied on top, e.g.
    ``["optim.lr=0.001", "data.valid=null"]``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read training config {str(path)!r}: {e}") from e
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(  # noqa: TRY004 (bad file content)
            f"{str(path)!r} must hold a YAML mapping (the TrainConfig fields)"
        )
    for item in overrides:
        _apply_override(doc, item)
    try:
        return TrainConfig.from_dict(doc)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{str(path)!r}: {e}") from e
