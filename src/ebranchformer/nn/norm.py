"""LayerNorm over the last axis, with its statistics in float32 under reduced precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import register

__all__ = ["LayerNorm"]


@register
class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm(dim, eps)`` that normalises bf16/fp16 input in float32 and casts back.

    Args:
        dim: feature size D.
        eps: variance epsilon (Default: ``1e-6``, RETURNN's; ESPnet uses ``1e-12``, torch ``1e-5``).

    Input and output: (..., D).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
        return super().forward(x)
