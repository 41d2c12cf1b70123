"""Depthwise convolution over time on batch-first (B, T, C) tensors, without leaving the (B, T, C) layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .autocast import cpu_autocast_dtype, cpu_bf16_emulated, rounded_float

__all__ = ["depthwise_conv_time", "weight_grad_blocked"]


def depthwise_conv_time(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, left: int, right: int, fast: bool = True
) -> torch.Tensor:
    """Depthwise conv over T of x (B, T, C) with ``weight`` (C, 1, K), zero padding ``left``/``right``.

    The plain path transposes to (B, C, T) for ``conv1d`` (a copy each way). The fast path views the same memory
    as a channels-last (B, C, 1, T) image and runs ``conv2d``, which oneDNN and cuDNN handle natively: no copies,
    and 1.15-1.3x faster encoder steps on CPU (measured by the bench on the LibriSpeech-100 encoder). With gradients
    on the CPU (outside autocast) its backward is :class:`_ConvBackwardSplit`'s.
    """
    c = weight.shape[0]
    cpu = x.device.type == "cpu"
    autocast = cpu_autocast_dtype() if cpu else None
    half = cpu and bool({torch.bfloat16, torch.float16} & {x.dtype, autocast})
    if half and (c < 32 or cpu_bf16_emulated(x)):
        # oneDNN's half-precision depthwise conv never returns for 2-16 channels (torch 2.13.0: bf16 in the
        # channels-last layout; fp16 in every layout on a CPU with AVX512-FP16, such as the project's Xeon VM), and
        # a CPU without oneDNN's bf16 kernels has only torch's slow reference one: these convs run in float32 on
        # the operands rounded to the half dtype that was asked for, and the result is rounded to it
        out_dtype = autocast or x.dtype
        with torch.autocast("cpu", enabled=False):
            xf, wf, bf = rounded_float(out_dtype, x, weight, bias)
            return depthwise_conv_time(xf, wf, bf, left, right, fast).to(out_dtype)
    if fast:
        pad = left if left == right else 0  # symmetric padding inside the conv (no padded copy)
        h = F.pad(x, (0, 0, left, right)) if (left or right) and not pad else x  # (B, T + k - 1 - 2 pad, C)
        h = h.transpose(1, 2).unsqueeze(2)  # (B, C, 1, T + k - 1 - 2 pad), channels-last strides
        w4 = weight.unsqueeze(2)  # (C, 1, 1, K)
        # under autocast torch's own backward (the split one saves the uncast input)
        if cpu and autocast is None and torch.is_grad_enabled() and bias is not None and bias.requires_grad:
            y = _ConvBackwardSplit.apply(h, w4, bias, pad)  # (B, C, 1, T)
        else:
            y = F.conv2d(h, w4, bias, padding=(0, pad), groups=c)  # (B, C, 1, T)
        return y.squeeze(2).transpose(1, 2)  # (B, T, C)
    h = F.pad(x.transpose(1, 2), (left, right))  # (B, C, T + k - 1)
    return F.conv1d(h, weight, bias, groups=c).transpose(1, 2)  # (B, T, C)


class _ConvBackwardSplit(torch.autograd.Function):
    """The channels-last depthwise ``conv2d`` whose backward takes the bias gradient as a plain sum over (B, T)
    instead of inside oneDNN's backward: (8, 499, 512) with K = 31, input + weight + bias gradients 0.78x the time of
    ``aten.convolution_backward`` computing all three (16.7 vs 21.6 ms; 0.85x at 256 channels; interleaved medians
    of 20, 2 threads). Same values: the input and weight gradients come from the same oneDNN calls. On one thread
    the weight gradient is :func:`weight_grad_blocked` (oneDNN's is 10x slower there than on two)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w4: torch.Tensor, bias: torch.Tensor, pad: int) -> torch.Tensor:
        ctx.save_for_backward(h, w4)
        ctx.pad = pad
        return F.conv2d(h, w4, bias, padding=(0, pad), groups=w4.shape[0])  # (B, C, 1, T)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w4 = ctx.saved_tensors
        c = w4.shape[0]

        def grad(mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
            return torch.ops.aten.convolution_backward(
                gy, h, w4, [c], [1, 1], [0, ctx.pad], [1, 1], False, [0, 0], c, mask
            )

        gh = grad([True, False, False])[0] if ctx.needs_input_grad[0] else None  # (B, C, 1, T')
        gw = None
        if ctx.needs_input_grad[1]:
            # (the thread count is not asked while torch.compile traces this: a graph break; it keeps oneDNN's)
            if not torch.compiler.is_compiling() and torch.get_num_threads() == 1:
                gw = weight_grad_blocked(gy[:, :, 0], h[:, :, 0], ctx.pad, w4.shape[-1]).view(w4.shape)
            else:
                # oneDNN's weight gradient with time as the image's height, (B, C, T, 1), the same memory: 0.5-0.7x
                # the time of its (B, C, 1, T) kernel (the forward's layout, whose input gradient is the fast one)
                gw = torch.ops.aten.convolution_backward(
                    gy.squeeze(2).unsqueeze(3), h.squeeze(2).unsqueeze(3), w4.view(c, 1, -1, 1), [c], [1, 1],
                    [ctx.pad, 0], [1, 1], False, [0, 0], c, [False, True, False],
                )[1].view(w4.shape)  # (C, 1, K, 1) -> (C, 1, 1, K)
        gb = gy.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None  # (C,)
        return gh, gw, gb, None


def weight_grad_blocked(gy: torch.Tensor, x: torch.Tensor, pad: int, k: int) -> torch.Tensor:
    """The weight gradient (C, K) of a depthwise conv over T: ``gw[c, j] = sum_{b,t} gy[b, c, t] xp[b, c, t + j]``
    with xp = x zero-padded by ``pad`` on both sides; gy (B, C, T_out), x (B, C, T_in), any strides.

    As one batched product over channels: time is cut into blocks of K frames, and block i of gy times the 2K
    frames of xp from i * K on gives every (j, j + lag) pair of the block; summing the (K, 2K) product's diagonals
    gives the K lags. Twice the multiply-adds of the direct sum, but in a GEMM. On one thread, (8, 512, 499) with
    K = 31: 29 ms against 168 ms for oneDNN's channels-last weight gradient and 43 ms for its NCHW one (medians of
    7; on two threads oneDNN's takes 17 ms and this one 28-41 ms, so it serves one thread only).
    """
    b, c, t_out = gy.shape
    t_in = x.shape[-1]
    if t_out != t_in + 2 * pad - k + 1:
        raise ValueError(f"gy has {t_out} frames, expected {t_in + 2 * pad - k + 1} for T_in={t_in}, pad={pad}, K={k}")
    nb = -(-t_out // k)  # blocks of K output frames per row
    row = (nb + 1) * k  # a row's length in the flat buffers: its frames, then zeros
    g = gy.new_zeros(c, b, row)  # (C, B, row)
    g[:, :, :t_out] = gy.permute(1, 0, 2)
    xf = x.new_zeros(c, b * row + k)  # (C, B * row + K); the last K: what the last block's window overruns
    xf[:, : b * row].view(c, b, row)[:, :, pad : pad + t_in] = x.permute(1, 0, 2)
    blocks = g.view(c, b * (nb + 1), k)  # (C, N, K), N = B * (nb + 1) blocks
    windows = xf.as_strided((c, b * (nb + 1), 2 * k), (b * row + k, k, 1))  # (C, N, 2K), overlapping views
    m = torch.bmm(blocks.transpose(1, 2), windows)  # (C, K, 2K): m[c, j, i] = sum_n g[c, n, j] xp[c, n K + i]
    return m.as_strided((c, k, k), (2 * k * k, 2 * k + 1, 1)).sum(1)  # (C, K): lag = i - j, summed over j
