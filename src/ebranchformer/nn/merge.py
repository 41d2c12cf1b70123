"""The E-Branchformer merge: depthwise conv over the concatenated branches, plus a projection."""

from __future__ import annotations

import torch
from torch import nn

from ..config import register
from .cgmlp import check_odd_kernel
from .dwconv import depthwise_conv_time
from .linear import Linear, linear
from .masking import check_frames, mask_padded

__all__ = ["Merge"]


@register
class Merge(nn.Module):
    """``merge_proj(z + dwconv_K(z))`` with ``z = concat(a, g)`` (attention branch first).

    Args:
        in_dim1: size of the first (attention) branch.
        in_dim2: size of the second (cgMLP) branch.
        out_dim: output size D.
        merge_conv_kernel: odd depthwise conv kernel (Default: ``3``; the paper's recipes use 31).

    Forward: ``(a (B, T, in_dim1), g (B, T, in_dim2), valid (B, T) or None) -> (B, T, D)``. With ``valid``, padded
    frames are zeroed before the conv (the residual ``z`` itself is not masked).

    Two equal computations are kept: the plain one concatenates; the fast one (``fast=True``, Default) uses that a
    depthwise conv acts per channel, so ``merge_proj`` splits into two halves and the (B, T, 2D) concat is never
    built.

    Example:
        >>> m = Merge(in_dim1=256, in_dim2=256, out_dim=256, merge_conv_kernel=31)
        >>> m(torch.randn(2, 10, 256), torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(self, *, in_dim1: int, in_dim2: int, out_dim: int, merge_conv_kernel: int = 3) -> None:
        super().__init__()
        k = check_odd_kernel("merge_conv_kernel", merge_conv_kernel)
        self.in_dim1, self.in_dim2 = int(in_dim1), int(in_dim2)
        cat = self.in_dim1 + self.in_dim2
        self.depthwise_conv_fusion = nn.Conv1d(cat, cat, k, groups=cat)  # applied 'same' (odd k)
        self.merge_proj = Linear(cat, out_dim)
        self.fast = True

    def forward(self, a: torch.Tensor, g: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        like = self.merge_proj.weight
        check_frames(a, valid, self.in_dim1, name="a", like=like, valid_optional=True)
        check_frames(g, valid, self.in_dim2, name="g", like=like, valid_optional=True)
        if g.shape[:2] != a.shape[:2]:
            raise ValueError(f"a and g must have the same (B, T), got {tuple(a.shape[:2])} and {tuple(g.shape[:2])}")
        w, b = self.depthwise_conv_fusion.weight, self.depthwise_conv_fusion.bias
        pad = (w.shape[-1] - 1) // 2
        if not self.fast:
            z = torch.cat([a, g], dim=-1)  # (B, T, 2D)
            zc = depthwise_conv_time(mask_padded(z, valid), w, b, pad, pad, fast=False)  # (B, T, 2D)
            return self.merge_proj(z + zc)
        # The conv is per channel, so each branch convolves on its own and merge_proj splits into two halves.
        d1 = self.in_dim1
        ac = depthwise_conv_time(mask_padded(a, valid), w[:d1], b[:d1], pad, pad)  # (B, T, D1)
        gc = depthwise_conv_time(mask_padded(g, valid), w[d1:], b[d1:], pad, pad)  # (B, T, D2)
        pw = self.merge_proj.weight  # (D, D1 + D2)
        on = self.merge_proj.onednn
        y = linear(a + ac, pw[:, :d1], self.merge_proj.bias, onednn=on)  # (B, T, D)
        return y + linear(g + gc, pw[:, d1:], onednn=on)
