"""Benchmark presets: an ESPnet ``encoder_conf`` plus the batch to time it on.

Every preset is an ESPnet LibriSpeech recipe encoder (or a shrunken one for tests) with ``input_layer: conv2d`` and
80-dim features at 100 frames/s. Layer drop is set to 0 so every timed run does the same work; all other dropouts
are the recipe's (they are active in the forward+backward measurement, which runs in train mode).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["PRESETS", "Preset", "batch_lengths", "get_preset"]

FRAMES_PER_SECOND = 100  # 10 ms feature hop


@dataclasses.dataclass(frozen=True)
class Preset:
    """A benchmark case.

    Attributes:
        name: preset name (``--preset``).
        encoder_conf: ESPnet ``EBranchformerEncoder`` options (keys verbatim).
        input_size: feature dim.
        batch: (batch size, padded input frames) on CPU.
        batch_cuda: the same on CUDA (Default: ``batch``).
        min_len_ratio: row lengths are spaced linearly from T down to ``min_len_ratio * T``.
        sweep_seconds: if set, a long-utterance sweep: batch 1, one forward per length (in seconds of audio),
            ours against ESPnet only; ``batch`` is ignored.
        description: one line for the report.
    """

    name: str
    encoder_conf: dict[str, Any]
    input_size: int = 80
    batch: tuple[int, int] = (8, 2000)
    batch_cuda: tuple[int, int] | None = None
    min_len_ratio: float = 0.8
    sweep_seconds: tuple[float, ...] | None = None
    description: str = ""

    def batch_for(self, device: str) -> tuple[int, int]:
        """(B, T) for a device type ("cpu" or "cuda")."""
        if device == "cuda" and self.batch_cuda is not None:
            return self.batch_cuda
        return self.batch

    @property
    def is_sweep(self) -> bool:
        return self.sweep_seconds is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _recipe(d: int, heads: int, blocks: int, cgmlp_units: int, linear_units: int, k: int = 31, m: int = 31,
            dropout: float = 0.1) -> dict[str, Any]:  # fmt: skip
    """The encoder_conf of ESPnet's LibriSpeech E-Branchformer recipes, with the given sizes."""
    return dict(
        output_size=d, attention_heads=heads, attention_layer_type="rel_selfattn", pos_enc_layer_type="rel_pos",
        rel_pos_type="latest", cgmlp_linear_units=cgmlp_units, cgmlp_conv_kernel=k, use_linear_after_conv=False,
        gate_activation="identity", num_blocks=blocks, dropout_rate=dropout, positional_dropout_rate=dropout,
        attention_dropout_rate=dropout, input_layer="conv2d", layer_drop_rate=0.0, linear_units=linear_units,
        positionwise_layer_type="linear", use_ffn=True, macaron_ffn=True, merge_conv_kernel=m,
    )  # fmt: skip


LS100 = _recipe(256, 4, 12, 1024, 1024)  # librispeech_100 e_branchformer_size256_mlp1024_linear1024_e12
LS960 = _recipe(512, 8, 17, 3072, 1024)  # librispeech train_asr_e_branchformer (paper "L"), layer drop 0.1 -> 0
TINY = _recipe(64, 4, 2, 256, 256, k=15, m=15)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("ls100", LS100, batch=(8, 2000),
               description="ESPnet LibriSpeech-100 encoder (d256 L12 h4 U1024 F1024 K=M=31, conv2d), 8 x 20 s"),
        Preset("ls960", LS960, batch=(4, 2000), batch_cuda=(16, 3000),
               description="ESPnet LibriSpeech-960 encoder (d512 L17 h8 U3072 F1024 K=M=31, conv2d); "
                           "CUDA 16 x 30 s, CPU 4 x 20 s"),
        Preset("long", LS100, sweep_seconds=(5, 10, 20, 40, 80),
               description="long-utterance sweep, LibriSpeech-100 encoder, batch 1, 5-80 s"),
        Preset("long960", LS960, sweep_seconds=(5, 10, 20, 40, 80),
               description="long-utterance sweep, LibriSpeech-960 encoder, batch 1, 5-80 s"),
        Preset("mid", LS100, batch=(4, 1000), description="LibriSpeech-100 encoder, 4 x 10 s (profiling size)"),
        Preset("tiny", TINY, batch=(3, 160), description="test size: d64 L2 h4 U256 F256 K=M=15, 3 x 1.6 s"),
        Preset("tiny-long", TINY, sweep_seconds=(1, 2, 4), description="test size sweep, 1-4 s"),
    ]
}  # fmt: skip


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def batch_lengths(batch: int, frames: int, min_len_ratio: float) -> torch.Tensor:
    """Row lengths (B,) spaced linearly from ``frames`` down to ``min_len_ratio * frames`` (row 0 is the longest:
    ESPnet needs the padded length to equal max(lengths))."""
    if batch <= 0 or frames <= 0:
        raise ValueError(f"batch and frames must be positive, got {batch}, {frames}")
    if not 0.0 < min_len_ratio <= 1.0:
        raise ValueError(f"min_len_ratio must be in (0, 1], got {min_len_ratio}")
    lo = max(1, round(frames * min_len_ratio))
    return torch.linspace(frames, lo, batch).round().long()
