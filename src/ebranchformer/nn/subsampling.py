"""ESPnet's input layers: ``Conv2dSubsampling`` (conv2d, conv2d2, conv2d6, conv2d8) and ``LinearInput``."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import register
from .autocast import cpu_autocast_dtype
from .conv_blocks import conv_len, conv_stack_blocks, conv_stack_train
from .frontend import Frontend
from .linear import Linear, linear
from .masking import lengths_to_valid
from .norm import LayerNorm

__all__ = ["Conv2dSubsampling", "FrameStacking", "LinearInput"]

# kind -> [(time/freq kernel, stride), ...]; every conv is "valid" (no padding) and followed by ReLU.
_CONVS = {
    "conv2d": [(3, 2), (3, 2)],
    "conv2d2": [(3, 2), (3, 1)],
    "conv2d6": [(3, 2), (5, 3)],
    "conv2d8": [(3, 2), (3, 2), (3, 2)],
}
# ESPnet <= 202511 subsamples the padded mask by slicing ``mask[..., :-trim:step]`` once per conv.
_LEGACY_SLICES = {
    "conv2d": [(2, 2), (2, 2)],
    "conv2d2": [(2, 2), (2, 1)],
    "conv2d6": [(2, 2), (4, 3)],
    "conv2d8": [(2, 2), (2, 2), (2, 2)],
}


@register
class Conv2dSubsampling(Frontend):
    """ESPnet's ``Conv2dSubsampling*``: 2-D convs (ReLU after each) over (time, freq), flatten, Linear to out_dim.

    Args:
        in_dim: feature dim F (e.g. 80).
        out_dim: model dim D; also the conv channels.
        kind: ``"conv2d"`` (x4, Default), ``"conv2d2"`` (x2), ``"conv2d6"`` (x6), ``"conv2d8"`` (x8).

    Forward: ``(x (B, T, F), lengths (B,), *, padding="masked") -> (y (B, T', D), lengths')``.

    - ``"masked"``: padded frames are zeroed before each conv, ``lengths'`` is each row's conv formula, so a row's
      output does not depend on its batch mates.
    - ``"espnet_legacy"``: ESPnet <= 202511: no masking, ``lengths'`` from slicing the padded mask (shorter rows get
      1-2 frames more than the conv formula). Expects T == max(lengths), as ESPnet does.

    The flatten order is channel-major (feature index ``c * F' + f``), as ESPnet's.

    Example:
        >>> sub = Conv2dSubsampling(80, 256)
        >>> y, n = sub(torch.randn(2, 100, 80), torch.tensor([100, 90]))
        >>> y.shape, n.tolist()
        (torch.Size([2, 24, 256]), [24, 21])
    """

    takes_model_dim = True

    def __init__(self, in_dim: int, out_dim: int, kind: str = "conv2d") -> None:
        super().__init__()
        if kind not in _CONVS:
            raise ValueError(f"kind must be one of {sorted(_CONVS)}, got {kind!r}")
        self.in_dim, self.out_dim, self.kind = int(in_dim), int(out_dim), kind
        self.convs = nn.ModuleList()
        f, c_in, t_min = self.in_dim, 1, 1
        for k, s in _CONVS[kind]:
            self.convs.append(nn.Conv2d(c_in, self.out_dim, k, s))
            f, c_in = conv_len(f, k, s), self.out_dim
        for k, s in reversed(_CONVS[kind]):
            t_min = (t_min - 1) * s + k  # shortest input giving one output frame
        if f < 1:
            raise ValueError(f"in_dim={in_dim} is too small for input_layer {kind!r} (frequency axis vanishes)")
        self.min_length = t_min
        self.out = Linear(self.out_dim * f, self.out_dim)
        self.fast = True  # channels-last convs when no gradients are needed (faster there, slower in training)
        # ... and on the CPU in blocks of frames (_forward_chunked), in inference and in training. Its Python loop
        # depends on T, so turn it off for torch.export / torch.compile(dynamic=True), which then trace one pass.
        self.chunked = True

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for k, s in _CONVS[self.kind]:
            lengths = conv_len(lengths, k, s)
        return lengths

    def legacy_lengths(self, lengths: torch.Tensor, padded_len: int) -> torch.Tensor:
        """ESPnet <= 202511's lengths: slice the padded (B, T) mask once per conv, count what is left."""
        c, w = lengths, padded_len
        for trim, step in _LEGACY_SLICES[self.kind]:
            c = (torch.clamp(c, max=w - trim) + step - 1) // step  # ceil(min(c, W - trim) / step)
            w = (w - trim + step - 1) // step
        return c

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, *, padding: str = "masked"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        masked = padding == "masked"
        self._check_forward(x, lengths, padding, per_row=masked)
        out_lengths = self.output_lengths(lengths) if masked else self.legacy_lengths(lengths, x.shape[1])
        grad = torch.is_grad_enabled()
        blocks = self.fast and self.chunked and x.device.type == "cpu"  # inference, and training (not eval + grad)
        if blocks and (not grad or (self.training and not x.requires_grad)):
            return self._forward_chunked(x, lengths if masked else None), out_lengths
        h = x[:, None]  # (B, 1, T, F)
        if self.fast and not grad:
            h = h.contiguous(memory_format=torch.channels_last)
        n = lengths
        for (k, s), conv in zip(_CONVS[self.kind], self.convs):
            if masked:
                h = h * lengths_to_valid(n, h.shape[2])[:, None, :, None].to(h.dtype)
                n = conv_len(n, k, s)
            h = F.relu(conv(h))  # (B, C, T', F')
        b, c, t, f = h.shape
        y = self.out(h.transpose(1, 2).reshape(b, t, c * f))  # (B, T', C*F') -> (B, T', D)
        return y, out_lengths

    def _forward_chunked(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """The CPU path: the same convs over blocks of output frames (:mod:`.conv_blocks`), so that a block's wide
        first-conv output stays in cache. The flatten Linear runs with its input columns permuted to the conv
        output's channels-last (F', C) order (no transposing copy of the activations): per block in inference,
        once over the (B, T', F', C) output in training, which gets a block-wise backward. ``lengths`` (masked
        mode) zeroes the padded frames before each conv, as the plain path does."""
        convs = _CONVS[self.kind]
        b, t_in, _ = x.shape
        valids = None
        if lengths is not None:
            valids, n, size = [], lengths, t_in
            for k, s in convs:
                valids.append(lengths_to_valid(n, size)[:, None, :, None])  # (B, 1, T_l, 1)
                n, size = conv_len(n, k, s), conv_len(size, k, s)
        dtype = cpu_autocast_dtype() or x.dtype
        weights = [(conv.weight.to(dtype), conv.bias.to(dtype)) for conv in self.convs]
        train = torch.is_grad_enabled()
        size = 2 * b * self.in_dim * self.out_dim * torch.finfo(dtype).bits // 8  # bytes per output frame
        budget = _TRAIN_BLOCK_BYTES if train else _HALF_BLOCK_BYTES if dtype.itemsize < 4 else _BLOCK_BYTES
        step = max(1, budget // size)
        c = self.convs[-1].out_channels
        w = self.out.weight.view(-1, c, self.out.in_features // c).transpose(1, 2)  # (D, F', C)
        w = w.reshape(-1, self.out.in_features)  # columns in (f, c) order, the conv output's channels-last order
        if not train:  # (B, r, F'*C) -> (B, r, D) per block
            w = w.to(dtype)  # once, not per block under autocast
            project = partial(linear, weight=w, bias=self.out.bias, onednn=self.out.onednn)
            return conv_stack_blocks(x, convs, weights, valids, step, project)
        h = conv_stack_train(x, convs, weights, valids, step)  # (B, T', F', C)
        return linear(h.flatten(2), w, self.out.bias, onednn=self.out.onednn)  # (B, T', F'*C) -> (B, T', D)


# Sizes a block of the chunked CPU path: about this many bytes of first-conv input features x channels per block
# (8 MiB was the fastest of 2, 8 and 32 on the LibriSpeech-100 frontend, fp32 and bf16). In training 16 MiB
# (12 output frames there) and 21 MiB were the fastest of 8, 16, 21 and 31 MiB (0.67x the one-pass time; 0.84x
# at 31 MiB).
_BLOCK_BYTES = 8 << 20
_TRAIN_BLOCK_BYTES = 16 << 20
# bf16 inference: 16 MiB (twice the frames of 8 MiB); on this session's Xeon VM (AMX) the ls100 bf16 forward took
# 0.96-0.97x the time of 8 MiB blocks (9 and 11 alternating rounds), 32 MiB 1.005-1.04x, 4 MiB 1.05-1.08x
_HALF_BLOCK_BYTES = 16 << 20


@register
class LinearInput(Frontend):
    """ESPnet's ``input_layer="linear"``: Linear(F, D), LayerNorm (eps ``1e-5``, torch's), dropout.

    Forward: ``(x (B, T, F), lengths, *, padding) -> (y (B, T, D), lengths)``.
    """

    takes_model_dim = True

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.linear = Linear(self.in_dim, self.out_dim)
        self.norm = LayerNorm(self.out_dim, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, *, padding: str = "masked"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(self.norm(self.linear(x))), lengths


@register
class FrameStacking(Frontend):
    """Stack ``factor`` consecutive frames and project: (B, T, F) -> (B, ceil(T/k), k*F) -> Linear -> (B, T', D).

    The cheapest subsampling: one matmul, no convolution. The last stack of a row is completed with zeros, and in
    ``"masked"`` mode padded frames are zeroed first, so each row's output depends on its own frames only.

    Args:
        in_dim: feature dim F.
        out_dim: model dim D.
        factor: frames per stack k (Default: ``4``).

    Forward: ``(x (B, T, F), lengths (B,), *, padding="masked") -> (y (B, ceil(T/k), D), ceil(lengths/k))``.

    Example:
        >>> fs = FrameStacking(80, 144, factor=4)
        >>> y, n = fs(torch.randn(2, 101, 80), torch.tensor([101, 50]))
        >>> y.shape, n.tolist()
        (torch.Size([2, 26, 144]), [26, 13])
    """

    takes_model_dim = True

    def __init__(self, in_dim: int, out_dim: int, factor: int = 4) -> None:
        super().__init__()
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        self.in_dim, self.out_dim, self.factor = int(in_dim), int(out_dim), factor
        self.linear = Linear(self.in_dim * factor, self.out_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + self.factor - 1) // self.factor

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, *, padding: str = "masked"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_forward(x, lengths, padding, per_row=True)
        if padding == "masked":
            x = x * lengths_to_valid(lengths, x.shape[1])[:, :, None].to(x.dtype)
        b, t, f = x.shape
        k = self.factor
        x = F.pad(x, (0, 0, 0, (-t) % k))  # (B, k*ceil(T/k), F)
        y = self.linear(x.reshape(b, -1, k * f))  # (B, T', k*F) -> (B, T', D)
        return y, self.output_lengths(lengths)
