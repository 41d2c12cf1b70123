"""RETURNN's ``ConformerConvSubsample`` frontend: a stack of 2-D convs (optionally max-pooled) over (time, freq).

Semantics are those of ``returnn.frontend.encoder.conformer.ConformerConvSubsample`` at the latest behavior
version: padded frames are masked before every conv (with 0) and pool (with -inf, zeroed again afterwards), and
``padding="same"`` pads a fixed ``(k-1)//2`` on the left and the rest on the right, also for strides > 1, so each
row's output depends only on its own frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import register
from .activations import get_activation
from .autocast import conv2d
from .frontend import Frontend
from .masking import lengths_to_valid

__all__ = ["ConformerConvSubsample"]

Size2 = int | Sequence[int]


def _pair(name: str, v: Size2) -> tuple[int, int]:
    """An int or a (time, freq) pair of positive ints as a tuple; raise naming ``name`` otherwise."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a (time, freq) pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{name} must be an int or a (time, freq) pair of ints, got {v!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        raise TypeError(f"{name} must be an int or a (time, freq) pair of ints, got {v!r}")
    if min(v) < 1:
        raise ValueError(f"{name} must be positive, got {tuple(v)}")
    return int(v[0]), int(v[1])


def _same_pads(k: int) -> tuple[int, int]:
    """RETURNN's consistent 'same' padding for a window of k: (left, right) = ((k-1)//2, k-1-left)."""
    left = (k - 1) // 2
    return left, k - 1 - left


def _conv_len(n, k: int, s: int, padding: str):
    """Output length of a conv (or pool) along one axis: 'same' ceil(n/s), 'valid' ceil((n-k+1)/s)."""
    if padding == "same":
        return (n + s - 1) // s
    return (n - k + s) // s


def _fill_padded(h: torch.Tensor, n: torch.Tensor, value: float) -> torch.Tensor:
    """Set the time frames ``t >= n[b]`` of an image (B, C, T, F) to ``value`` (a select, so inf/NaN there go)."""
    valid = lengths_to_valid(n, h.shape[2])[:, None, :, None]  # (B, 1, T, 1)
    return h.masked_fill(~valid, value)


def _min_input_len(n_out: int, k: int, s: int, padding: str) -> int:
    """The shortest input length giving at least ``n_out`` output frames."""
    return (n_out - 1) * s + (k if padding == "valid" else 1)


@register
class ConformerConvSubsample(Frontend):
    """2-D conv subsampling frontend, RETURNN's ``ConformerConvSubsample`` (``ConformerEncoder`` ``input_layer``).

    ::

        h = x as an image (B, 1, T, F)
        for each conv i:  h = act(conv_i(mask0(h)));  if pool i:  h = mask0(maxpool_i(mask(-inf)(h)))
        y = h flattened frequency-major, channel-minor: y[..., f * C + c] = h[:, c, :, f]

    Args:
        in_dim: input feature dim F (e.g. 80).
        out_dims: channels of each conv; the last one is C.
        filter_sizes: kernel of each conv, an int or a (time, freq) pair.
        strides: stride of each conv, int or (time, freq) (Default: all 1).
        pool_sizes: max-pool after conv i for i < len(pool_sizes), int or (time, freq); kernel = stride = size
            (Default: no pooling).
        activation: after each conv, a name (see ``ebranchformer.nn.activations``) or a callable
            (Default: ``"relu"``).
        padding: ``"same"`` (Default; output length ``ceil(n / s)``) or ``"valid"`` (``ceil((n - k + 1) / s)``)
            for the convs; the pools always use "same".

    Attributes: ``in_dim``, ``out_dim`` (= ``F_out * C``), ``min_length`` (the shortest input with one output
    frame), ``downsample_factor`` (the product of the time strides and time pool sizes).

    Forward: ``(x (B, T, F), lengths (B,), *, padding="masked") -> (y (B, T', out_dim), lengths' (B,))``, with each
    row's own output length. ``padding="espnet_legacy"`` turns the masking off (RETURNN ``rf_use_mask=False``): the
    padded frames then leak into the last valid frames of shorter rows; lengths are computed the same way.

    Two equal computations are kept. The plain one (``fast=False``) spells out RETURNN's steps: pad, conv, mask
    with -inf, ``max_pool2d``, mask with 0. The fast one (``fast=True``, Default) keeps the images channels-last
    (oneDNN's fast conv layout; the flatten is then a view), pads inside the conv where the padding is symmetric,
    pads a pool's input only to whole windows, and skips the -inf fill where a pool window spans one frame (each
    window is then all valid or all padding, and padding is zeroed after the pool). Without gradients the pool is
    an elementwise maximum of strided views, and on the CPU (``chunked=True``, Default) the masks write only each
    row's padded tail frames, in place (a Python loop over the lengths, skipped while torch.compile or
    torch.export traces). On the "conv6" frontend below (8 x 20 s, 2 threads) this took 0.22x the plain path's
    time in inference and 0.69x in forward+backward (BENCHMARKS.md).

    The standard RETURNN "conv6" frontend (x6 in time, 80 -> 40 frequencies, out_dim 2560):

    Example:
        >>> sub = ConformerConvSubsample(
        ...     80, out_dims=[32, 64, 64], filter_sizes=[(3, 3)] * 3, pool_sizes=[(1, 2)],
        ...     strides=[(1, 1), (3, 1), (2, 1)])
        >>> y, n = sub(torch.randn(2, 100, 80), torch.tensor([100, 61]))
        >>> y.shape, n.tolist(), sub.out_dim
        (torch.Size([2, 17, 2560]), [17, 11], 2560)
    """

    def __init__(
        self,
        in_dim: int,
        *,
        out_dims: Sequence[int],
        filter_sizes: Sequence[Size2],
        strides: Sequence[Size2] | None = None,
        pool_sizes: Sequence[Size2] | None = None,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
        padding: str = "same",
    ) -> None:
        super().__init__()
        if not isinstance(in_dim, int) or isinstance(in_dim, bool) or in_dim <= 0:
            raise ValueError(f"in_dim must be a positive int, got {in_dim!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if not isinstance(out_dims, (list, tuple)) or not out_dims:
            raise ValueError(f"out_dims must be a non-empty list of channel counts, got {out_dims!r}")
        for c in out_dims:
            if not isinstance(c, int) or isinstance(c, bool) or c <= 0:
                raise ValueError(f"out_dims must hold positive ints, got {list(out_dims)!r}")
        n = len(out_dims)
        if strides is None:
            strides = [1] * n
        for name, seq in (("filter_sizes", filter_sizes), ("strides", strides)):
            if not isinstance(seq, (list, tuple)) or len(seq) != n:
                raise ValueError(f"{name} must be a list of the same length as out_dims ({n}), got {seq!r}")
        pool_sizes = [] if pool_sizes is None else pool_sizes
        if not isinstance(pool_sizes, (list, tuple)) or len(pool_sizes) > n:
            raise ValueError(f"pool_sizes must be a list of at most len(out_dims)={n} sizes, got {pool_sizes!r}")
        self.in_dim = int(in_dim)
        self.padding = padding
        self.filter_sizes = [_pair(f"filter_sizes[{i}]", k) for i, k in enumerate(filter_sizes)]
        self.strides = [_pair(f"strides[{i}]", s) for i, s in enumerate(strides)]
        self.pool_sizes = [_pair(f"pool_sizes[{i}]", p) for i, p in enumerate(pool_sizes)]
        self.activation = get_activation(activation)
        self.conv_layers = nn.ModuleList()
        c_in, f = 1, self.in_dim
        for i, c_out in enumerate(out_dims):
            self.conv_layers.append(nn.Conv2d(c_in, c_out, self.filter_sizes[i], stride=self.strides[i]))
            f = _conv_len(f, self.filter_sizes[i][1], self.strides[i][1], padding)
            if i < len(self.pool_sizes):
                f = _conv_len(f, self.pool_sizes[i][1], self.pool_sizes[i][1], "same")
            if f < 1:
                raise ValueError(
                    f"in_dim={in_dim} is too small for these filter_sizes/strides: the frequency axis vanishes "
                    f"after conv {i}"
                )
            c_in = c_out
        self.freq_out = f
        self.out_dim = f * c_in
        t_min = 1
        for i in reversed(range(n)):
            if i < len(self.pool_sizes):
                p = self.pool_sizes[i][0]
                t_min = _min_input_len(t_min, p, p, "same")
            t_min = _min_input_len(t_min, self.filter_sizes[i][0], self.strides[i][0], padding)
        self.min_length = t_min
        self.downsample_factor = math.prod(s[0] for s in self.strides) * math.prod(p[0] for p in self.pool_sizes)
        self.fast = True  # channels-last, pads inside the conv, whole-window pools (_forward_fast)
        self.chunked = True  # ... and in CPU inference the masks on each row's padded tail only, in place

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Each row's output length: per conv ``ceil(n / s_t)`` ("same") or ``ceil((n - k_t + 1) / s_t)``
        ("valid"), per pool ``ceil(n / p_t)``."""
        n = lengths
        for i in range(len(self.conv_layers)):
            n = _conv_len(n, self.filter_sizes[i][0], self.strides[i][0], self.padding)
            if i < len(self.pool_sizes):
                n = _conv_len(n, self.pool_sizes[i][0], self.pool_sizes[i][0], "same")
        return n

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, *, padding: str = "masked"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_forward(x, lengths, padding, per_row=True)
        lengths = lengths.long()
        masked = padding == "masked"
        h, n = self._forward_fast(x, lengths, masked) if self.fast else self._forward_plain(x, lengths, masked)
        b, c, t, f = h.shape
        y = h.permute(0, 2, 3, 1).reshape(b, t, f * c)  # (B, T', F', C) -> (B, T', F' * C); a view if channels-last
        return y, n

    def _forward_plain(self, x: torch.Tensor, n: torch.Tensor, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = x[:, None]  # (B, 1, T, F)
        for i, conv in enumerate(self.conv_layers):
            (kt, kf), st = self.filter_sizes[i], self.strides[i][0]
            if masked:
                h = _fill_padded(h, n, 0.0)
            if self.padding == "same":
                h = F.pad(h, (*_same_pads(kf), *_same_pads(kt)))  # (B, C, T + kt - 1, F + kf - 1)
            h = self.activation(conv(h))  # (B, C_i, T_i, F_i)
            n = _conv_len(n, kt, st, self.padding)
            if i < len(self.pool_sizes):
                pt, pf = self.pool_sizes[i]
                if masked:
                    h = _fill_padded(h, n, float("-inf"))
                h = F.pad(h, (*_same_pads(pf), *_same_pads(pt)), value=float("-inf"))  # (B, C, T+pt-1, F+pf-1)
                h = F.max_pool2d(h, (pt, pf), stride=(pt, pf))  # (B, C_i, ceil(T_i/pt), ceil(F_i/pf))
                n = _conv_len(n, pt, pt, "same")
                if masked:
                    h = _fill_padded(h, n, 0.0)  # also clears the all -inf windows past the end
        return h, n

    def _forward_fast(self, x: torch.Tensor, n: torch.Tensor, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain path's values (see the class docstring) on channels-last (B, C, T, F) images."""
        # in place only on tensors made here, without autograd, and not while torch.compile/export traces
        inplace = self.chunked and x.device.type == "cpu" and not torch.is_grad_enabled()
        inplace = inplace and not torch.compiler.is_compiling()
        h = x[:, None].contiguous(memory_format=torch.channels_last)  # (B, 1, T, F), may share x's memory
        zeroed = not masked  # whether h's padded frames are 0 already (or need not be)
        for i, conv in enumerate(self.conv_layers):
            (kt, kf), (st, sf) = self.filter_sizes[i], self.strides[i]
            if not zeroed:
                h = _fill_tails(h, n, 0.0, copy=i == 0) if inplace else _fill_padded(h, n, 0.0)
            pad = (0, 0)
            if self.padding == "same":
                (lt, rt), (lf, rf) = _same_pads(kt), _same_pads(kf)
                if (lt, lf) == (rt, rf):
                    pad = (lt, lf)  # symmetric: inside the conv, no padded copy
                else:
                    h = F.pad(h, (lf, rf, lt, rt))  # (B, C, T + kt - 1, F + kf - 1)
            h = conv2d(h, conv.weight, conv.bias, (st, sf), pad)  # (B, C_i, T_i, F_i), channels-last
            h = F.relu_(h) if self.activation is F.relu else self.activation(h)  # h is the conv's own output
            zeroed = not masked
            n = _conv_len(n, kt, st, self.padding)
            if i < len(self.pool_sizes):
                pt, pf = self.pool_sizes[i]
                if masked and pt > 1:  # a window may span valid and padded frames: the padded ones must lose
                    h = _fill_tails(h, n, float("-inf")) if inplace else _fill_padded(h, n, float("-inf"))
                h = _max_pool_same(h, pt, pf)  # (B, C_i, ceil(T_i/pt), ceil(F_i/pf))
                n = _conv_len(n, pt, pt, "same")
                if masked:  # also clears the all -inf windows past the end
                    h = _fill_tails(h, n, 0.0) if inplace else _fill_padded(h, n, 0.0)
                    zeroed = True
        return h, n


def _fill_tails(h: torch.Tensor, n: torch.Tensor, value: float, copy: bool = False) -> torch.Tensor:
    """:func:`_fill_padded` in place, writing only each row's padded tail frames ``t >= n[b]`` of h (B, C, T, F);
    with ``copy`` into a channels-last copy of h when there is anything to write."""
    t = h.shape[2]
    tails = [(b, nb) for b, nb in enumerate(n.tolist()) if nb < t]
    if tails and copy:
        h = h.clone(memory_format=torch.channels_last)
    for b, nb in tails:
        h[b, :, nb:] = value
    return h


def _max_pool_same(h: torch.Tensor, pt: int, pf: int) -> torch.Tensor:
    """Max pool with kernel = stride = (pt, pf) and RETURNN's "same" padding with -inf: (B, C, T, F) ->
    (B, C, ceil(T/pt), ceil(F/pf)). The image is padded (or cropped) to whole windows only. Without gradients the
    pool is the elementwise maximum of the pt * pf strided views (cheaper on the CPU); with them ``max_pool2d``,
    whose gradient goes to one element of a tie (``maximum`` would split it), as the plain path's."""
    t, f = h.shape[2:]
    lt, lf = _same_pads(pt)[0], _same_pads(pf)[0]
    to, fo = _conv_len(t, pt, pt, "same"), _conv_len(f, pf, pf, "same")  # ceil(T/pt), ceil(F/pf) windows
    rt, rf = to * pt - lt - t, fo * pf - lf - f  # right pads to whole windows (< 0: a crop)
    if lt or rt or lf or rf:
        h = F.pad(h, (lf, rf, lt, rt), value=float("-inf"))  # (B, C, ceil(T/pt) * pt, ceil(F/pf) * pf)
    if torch.is_grad_enabled():
        return F.max_pool2d(h, (pt, pf), stride=(pt, pf))
    out = h[:, :, 0::pt, 0::pf]
    for i in range(pt):
        for j in range(pf):
            if i or j:
                out = torch.maximum(out, h[:, :, i::pt, j::pf])  # (B, C, T', F')
    return out
