"""What an encoder frontend (``input_layer``) provides, and the shared too-short check."""

from __future__ import annotations

import torch
from torch import nn

from .masking import check_encoder_input

__all__ = ["Frontend", "check_min_length"]

PADDING_MODES = ("masked", "espnet_legacy")


class Frontend(nn.Module):
    """Base of the input layers: ``forward(x (B, T, F), lengths (B,), *, padding) -> (y (B, T', out_dim), lengths')``.

    Subclasses set ``in_dim``, ``out_dim`` and ``min_length`` (the shortest input that yields one output frame)
    and implement ``output_lengths`` (each row's own output length, the ``"masked"`` rule).
    """

    in_dim: int
    out_dim: int
    min_length: int = 1
    takes_model_dim: bool = False  # True: the encoder passes out_dim=D when the spec does not set it

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_forward(self, x: torch.Tensor, lengths: torch.Tensor, padding: str, per_row: bool) -> None:
        """Validate a forward call: the padding mode, (x, lengths), and that the input is long enough."""
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        check_encoder_input(x, lengths, self.in_dim, like=next(self.parameters(), None))
        check_min_length(type(self).__name__, lengths, x.shape[1], self.min_length, per_row=per_row)


def check_min_length(name: str, lengths: torch.Tensor, padded_len: int, min_length: int, per_row: bool) -> None:
    """Raise ValueError when the input is too short for the subsampling.

    ``per_row``: every row must reach ``min_length`` (masked mode); else only the padded length (ESPnet's check).
    """
    if min_length <= 1 or torch.compiler.is_compiling():
        return
    shortest = int(lengths.min()) if per_row else padded_len
    if shortest < min_length:
        what = "min(lengths)" if per_row else "the padded length T"
        raise ValueError(
            f"input too short for the subsampling: input_layer {name!r} needs at least {min_length} frames, "
            f"got {what}={shortest}"
        )
