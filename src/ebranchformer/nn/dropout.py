"""Dropout, elementwise (ESPnet, PyTorch) or broadcast over all but the feature axis (RETURNN's default)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["Dropout", "dropout_bool_mask", "keep_mask", "keep_scale"]

_LEVELS = 1 << 16  # the drop probability is a multiple of 2^-16


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str) -> torch.Tensor:
    """A bool keep-mask of ``shape``, each entry independently False with probability round(p * 2^16) / 2^16
    (0.1 -> 0.1000061; at most 1 - 2^-16).

    Drawn as 16-bit uniform integers, four per 64-bit value (the float ``uniform >= p`` this replaces, one value per
    entry, was 9% of a LibriSpeech-100 training step; ``bernoulli_`` is 1.5-2x slower still). On the CPU the 64-bit
    values come from numpy's SFC64 generator seeded with one draw from torch's default generator, so
    ``torch.manual_seed`` still fixes every mask: torch's CPU generator (a Mersenne Twister) took 2.2x as long for
    the same bits (4.0 vs 1.8 ms for 2^20 values, 2 threads). Other devices draw from torch's generator there.
    :func:`keep_scale` gives the matching 1 / P(keep).
    """
    n = math.prod(shape)
    if n == 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = (n + 3) // 4  # 64-bit values drawn
    if torch.device(device).type == "cpu":
        bits = sfc64_bits(torch.randint(0, 1 << 62, (1,)), m)  # (m,), seeded from torch's default CPU generator
    else:  # randint's exclusive upper bound leaves out one of 2^64 values (2^-64 of bias)
        bits = torch.randint(-(1 << 63), (1 << 63) - 1, (m,), dtype=torch.int64, device=device)
    u16 = bits.view(torch.int16)[:n]  # (n,) uniform over [-2^15, 2^15)
    return (u16 >= _drop_levels(p) - (_LEVELS >> 1)).view(shape)


# A custom op: torch.compile and torch.export see one opaque node (a pure function of the seed tensor, which they
# draw with their own generator) instead of numpy code they cannot trace.
@torch.library.custom_op("ebranchformer::sfc64_bits", mutates_args=())
def sfc64_bits(seed: torch.Tensor, m: int) -> torch.Tensor:
    """m uniform 64-bit values (int64, CPU) from numpy's SFC64 generator seeded with ``seed`` (one int64)."""
    return torch.from_numpy(np.random.SFC64(int(seed)).random_raw(m).view(np.int64))  # (m,)


@sfc64_bits.register_fake
def _(seed: torch.Tensor, m: int) -> torch.Tensor:
    return seed.new_empty((m,))


def keep_scale(p: float) -> float:
    """1 / P(keep) for :func:`keep_mask`'s drop probability p: the factor that keeps the expectation unchanged."""
    return _LEVELS / (_LEVELS - _drop_levels(p))


def _drop_levels(p: float) -> int:
    return min(round(p * _LEVELS), _LEVELS - 1)  # p just below 1 keeps 1 in 2^16, never none


def dropout_bool_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Elementwise dropout that keeps a one-byte mask for backward (``F.dropout`` keeps a float one on the CPU, 4x
    the memory). Gradients reach ``x`` only."""
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), keep_scale(p))  # (..., D)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` both ways (:func:`_masked_scale`), ``keep`` bool, saved as it is (one byte per entry)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked_scale(x, keep, scale)  # (..., D)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _masked_scale(g, keep, ctx.scale), None, None


_CHUNK = 1 << 18  # entries per chunk of the CPU product (1 MiB of float32)


def _masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` times the bool ``keep`` times ``scale``, a new tensor.

    Plain path: ``x * keep * scale``, the mask entering as its uint8 view (the same bytes; a float x bool product
    takes a slower mixed-dtype path on the CPU: 2.5 against 1.4 ms for (8, 499, 1024)). On the CPU, for contiguous
    tensors of at least two chunks: a float x uint8 product (the mask's uint8 view) and the scaling, chunk by chunk.
    torch converts the uint8 operand to a float copy first; over the whole tensor that copy was a fresh 16 MiB for a
    (8, 499, 1024) mask, which took 0.7 s of a 7.2 s LibriSpeech-100 training step (5-20 ms per copy there, 0.6 ms
    alone), while per 1 MiB chunk the copy stays small and in cache. For that mask alone: ``where(keep, x, 0)`` and
    the scaling 3.1 ms, the chunks 1.7 ms. The training step, alternating in one process, 7 rounds per set (ratio of
    medians, median of per-round ratios): ``where`` against the whole-tensor product 0.950 / 0.967; these chunks
    against ``where`` 0.972 / 0.999 and 0.983 / 0.976 (BENCHMARKS.md, session 17), a small gain within the VM's
    noise. That holds for a process that runs this encoder alone; with ESPnet's step run between ours (the
    benchmark's interleaving, whose heap growth leaves glibc holding warm pages) the whole-tensor product was the
    fastest and these chunks cost 2-5%. The same values as the plain path (one product by 1 or 0, then one by
    ``scale``; a dropped NaN stays NaN, as in ``F.dropout``)."""
    # (while torch.compile traces, the plain path: one fused kernel there, and no loop over a dynamic size)
    k8 = keep.view(torch.uint8)  # the same bytes
    if torch.compiler.is_compiling() or not (
        x.device.type == "cpu" and x.is_contiguous() and keep.is_contiguous() and x.numel() >= 2 * _CHUNK
    ):
        return (x * k8).mul_(scale)  # (..., D)
    xf, kf = x.view(-1), k8.view(-1)  # (N,) each
    out = torch.empty_like(xf)  # (N,)
    for a in range(0, xf.numel(), _CHUNK):
        e = a + _CHUNK
        torch.mul(xf[a:e], kf[a:e], out=out[a:e]).mul_(scale)
    return out.view(x.shape)  # (..., D)


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
