"""A two-conv frontend block's parameter gradients as matrix products over stride-phase-split activations.

The chunked conv2d frontend's training backward (:mod:`.conv_blocks`) recomputes, per block of output frames, the
first conv's output h (one input channel in, C out) and needs the second conv's ("valid", kernel k, stride s)
weight and input gradients. oneDNN's ``convolution_backward`` does that at 100-200 GFLOP/s. Here h is stored as
its s x s stride phases, phase (a, b) holding h[s t + a, s f + b] on a grid of rows (t, batch, f) with C channels
each: every tap (i, j) of the conv then reads its phase (i % s, j % s) at a constant row shift
((i // s) * rows per t + j // s), so it is one contiguous (N, C) slice of that phase, and

- the weight gradient of tap (i, j) is one product G^T (C_out x N) times that slice (N x C), G (N, C_out) the
  output gradient on the same grid (zero on its padding rows);
- the input gradient is, per tap, G times the tap's (C_out, C) weight, accumulated into its phase at the tap's
  shift (``addmm_``), with no col2im pass.

The first conv's weight and bias gradients then come from one (k0*k0, N) x (N, C) product over its taps arranged on
the same grid. On the LibriSpeech-100 frontend's blocks (256 channels, k = 3, s = 2) the products took 0.77-0.85x
the time of oneDNN's backward (16.4 vs 19.4 ms on 2 threads for 8 rows, 32.3 vs 42.0 ms on 1 thread for 4).
The values are those of the same sums in another order (float32 rounding); the ReLUs see the first conv's
output exactly as the forward computed it (the same ``conv2d`` call).
"""

from __future__ import annotations

import torch

from .autocast import conv2d
from .linear import addmm_, mm, mm_left_t

__all__ = ["two_conv_param_grads"]


def _phase_counts(n: int, s: int) -> list[int]:
    """How many of n positions fall in each stride phase a = 0 .. s-1 (positions a, a + s, ...)."""
    return [(n - a + s - 1) // s if n > a else 0 for a in range(s)]


def two_conv_param_grads(
    x: torch.Tensor, g: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, s0: int, s1: int,
    valid1: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (gw0, gb0, gw1, gb1) of ``y = conv1(mask1 * relu(conv0(x)))`` ("valid" convs, strides s0, s1) for
    its output gradient ``g`` (B, r, F', C1) taken through the last ReLU already.

    x: (B, 1, T0, F0), the first conv's (masked) input (float32 in the frontend; any float dtype works);
    w0 (C, 1, k0, k0), b0 (C,); w1 (C1, C, k, k); valid1: (B, T1) bool, the second conv's valid input frames (None:
    all). Returns gradients in x's dtype, shaped like w0, b0, w1 and (C1,).
    """
    b, r, f_out, c1 = g.shape
    c, k0, k = w0.shape[0], w0.shape[-1], w1.shape[-1]
    h = torch.relu_(conv2d(x, w0, b0, s0))  # (B, C, T1, F1) channels-last: the forward's first conv
    t1, f1 = h.shape[2], h.shape[3]
    tp, fq = -(-t1 // s1), -(-f1 // s1)  # phase grid: rows (t, b, f), tp x B x fq
    grid, n = tp * b * fq, r * b * fq  # rows of a phase; rows of the output grid (its t < r)
    tail = (k - 1) // s1  # the largest frequency shift reaches this far past a phase's grid
    hp = h.new_zeros(s1 * s1, grid + tail, c)  # (s1*s1, rows, C): h's phases, zero off the grid's data
    taps = x.new_zeros(s1 * s1, grid + tail, k0 * k0)  # the first conv's taps of every h position, on the grid
    h_btfc, xs = h.permute(0, 2, 3, 1), x[:, 0]  # (B, T1, F1, C), the channels-last memory; (B, T0, F0)
    rows_t, cols_f = _phase_counts(t1, s1), _phase_counts(f1, s1)
    for a in range(s1):
        for bb in range(s1):
            tq, fqq = rows_t[a], cols_f[bb]
            if tq == 0 or fqq == 0:  # an empty phase (h has fewer than s1 frames or frequencies)
                continue
            on_grid = (slice(None, tq), slice(None), slice(None, fqq))  # its (Tq, B, Fq) positions on the grid
            dst = hp[a * s1 + bb, :grid].view(tp, b, fq, c)[on_grid]  # (Tq, B, Fq, C)
            dst.copy_(h_btfc[:, a::s1, bb::s1].permute(1, 0, 2, 3))
            if valid1 is not None:
                dst.mul_(valid1[:, a::s1].t()[:, :, None, None].to(dst.dtype))  # mask the second conv's input
            win = xs[:, s0 * a :, s0 * bb :].unfold(1, k0, s0 * s1).unfold(2, k0, s0 * s1)[:, :tq, :fqq]
            dst = taps[a * s1 + bb, :grid].view(tp, b, fq, k0 * k0)[on_grid]  # (Tq, B, Fq, k0*k0)
            dst.copy_(win.reshape(b, tq, fqq, k0 * k0).permute(1, 0, 2, 3))
    gg = g.new_zeros(r, b, fq, c1)  # (r, B, fq, C1): the output gradient on the grid
    gg[:, :, :f_out] = g.permute(1, 0, 2, 3)
    gg = gg.view(n, c1)  # (N, C1)
    w1t = w1.permute(2, 3, 0, 1).contiguous()  # (k, k, C1, C): tap (i, j)'s weight
    gw1 = g.new_empty(k, k, c1, c)
    gin = torch.zeros_like(hp)  # (s1*s1, rows, C): the input gradient on the phases
    ggt = mm_left_t(gg)  # (C1, N), the left operand of every tap's weight gradient
    for i in range(k):
        for j in range(k):
            q, shift = (i % s1) * s1 + j % s1, (i // s1) * b * fq + j // s1
            mm(ggt, hp[q, shift : shift + n], out=gw1[i, j])  # (C1, C)
            addmm_(gin[q, shift : shift + n], gg, w1t[i, j])  # (N, C)
    gw1 = gw1.permute(2, 3, 0, 1)  # (C1, C, k, k)
    g0 = torch.ops.aten.threshold_backward(gin, hp, 0)  # through the mask and the ReLU (hp is 0 at both)
    g0 = g0.view(-1, c)  # (rows, C)
    gw0 = taps.view(-1, k0 * k0).t().mm(g0)  # (k0*k0, C)
    return gw0.t().reshape(c, 1, k0, k0), g0.sum(0), gw1, gg.sum(0)
