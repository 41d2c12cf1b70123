"""Dropout, elementwise (ESPnet, PyTorch) or broadcast over all but the feature axis (RETURNN's default)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Dropout", "dropout_bool_mask"]


def dropout_bool_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Elementwise dropout that keeps a bool mask for backward (``F.dropout`` keeps a float one on the CPU, 4x the
    memory) and draws it as ``uniform >= p`` (float32), which on the CPU is 1.5-2x faster than ``bernoulli_``."""
    keep = torch.rand(x.shape, device=x.device) >= p  # (..., D) bool, P(keep) = 1 - p
    return (x * keep).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """Dropout that acts only in training mode.

    Args:
        p: drop probability (Default: ``0.1``).
        broadcast: if True, one keep-mask of shape (D,) is drawn per call and shared by every batch entry and frame,
            which is RETURNN's ``rf_dropout_broadcast`` behaviour. If False (Default), ordinary elementwise dropout.

    Input and output: (..., D).
    """

    def __init__(self, p: float = 0.1, broadcast: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
        self.p = float(p)
        self.broadcast = bool(broadcast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.broadcast:
            return dropout_bool_mask(x, self.p)
        keep = torch.empty(x.shape[-1], device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.p)  # (D,)
        return x * (keep / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, broadcast={self.broadcast}"
