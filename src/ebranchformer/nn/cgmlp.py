"""The convolutional gating MLP (cgMLP), the local branch of the E-Branchformer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import build_module, register
from .activations import get_activation
from .dropout import Dropout
from .dwconv import depthwise_conv_time
from .linear import Linear
from .masking import check_frames, mask_padded
from .norm import LayerNorm

__all__ = ["FeedForwardConvGated", "check_odd_kernel"]


def check_odd_kernel(name: str, k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer (symmetric 'same' padding), got {k}")
    return k


@register
class FeedForwardConvGated(nn.Module):
    """Convolutional Gating MLP with a Convolutional Spatial Gating Unit (CSGU).

    ::

        h        = activation(linear_ff(x))            # (B, T, 2C)
        r, g     = h[..., :C], h[..., C:]              # values first, gate second (ESPnet's order)
        g        = act_gate([linear_after_conv](dwconv_K(norm(g))))
        y        = linear_out(dropout(r * g))

    Args:
        out_dim: model dim D.
        ff_dim: gate size C, *half* of ESPnet's ``cgmlp_linear_units`` (Default: ``3 * out_dim``).
        kernel_size: odd depthwise conv kernel over time (Default: ``31``).
        dropout: dropout on ``r * g`` (Default: ``0.1``).
        activation: after ``linear_ff`` for both halves (Default: ``"gelu"``, exact erf GELU).
        gate_activation: on the gate after the conv (Default: ``"identity"``; ESPnet also allows
            ``"tanh"``, ``"relu"``, ``"hardtanh"``, ``"selu"``, ``"swish"``).
        with_bias: biases in the Linear layers and the conv (Default: ``True``).
        norm: the gate's normalisation, a class / ``build_dict`` / module, built as ``norm(C, eps=norm_eps)``
            (Default: :class:`LayerNorm`).
        norm_eps: epsilon for the default norm (Default: ``1e-6``; ESPnet ``1e-12``).
        use_linear_after_conv: ESPnet's extra C -> C Linear after the conv (Default: ``False``).
        dropout_broadcast: RETURNN-style feature-broadcast dropout (Default: ``False``).

    Forward: ``(x (B, T, D), valid (B, T) bool or None) -> (B, T, D)``. With ``valid`` given, padded frames are
    zeroed before the conv so every row sees only its own frames; with None they take part (ESPnet <= 202511).

    Example:
        >>> m = FeedForwardConvGated(256, ff_dim=512)
        >>> m(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(
        self,
        out_dim: int,
        *,
        ff_dim: int | None = None,
        kernel_size: int = 31,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "gelu",
        gate_activation: str | Callable[[torch.Tensor], torch.Tensor] = "identity",
        with_bias: bool = True,
        norm: Any = LayerNorm,
        norm_eps: float = 1e-6,
        use_linear_after_conv: bool = False,
        dropout_broadcast: bool = False,
    ) -> None:
        super().__init__()
        c = 3 * out_dim if ff_dim is None else int(ff_dim)
        if out_dim <= 0 or c <= 0:
            raise ValueError(f"out_dim and ff_dim must be positive, got out_dim={out_dim}, ff_dim={c}")
        k = check_odd_kernel("kernel_size", kernel_size)
        self.gate_dim = c
        self.linear_ff = Linear(out_dim, 2 * c, bias=with_bias)
        self.activation = get_activation(activation)
        self.norm = _build_norm(norm, c, norm_eps)
        self.conv = nn.Conv1d(c, c, k, groups=c, bias=with_bias)  # applied 'same' by depthwise_conv_time
        self.linear_after_conv = Linear(c, c, bias=with_bias) if use_linear_after_conv else None
        self.gate_activation = get_activation(gate_activation)
        self.dropout = Dropout(dropout, dropout_broadcast)
        self.linear_out = Linear(c, out_dim, bias=with_bias)
        self.fast = True  # channels-last conv2d for the depthwise conv (see depthwise_conv_time)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        check_frames(x, valid, self.linear_ff.in_features, like=self.linear_ff.weight, valid_optional=True)
        h = self.linear_ff.act(x, self.activation)  # (B, T, 2C)
        r, g = h.split(self.gate_dim, dim=-1)  # (B, T, C) each
        g = mask_padded(self.norm(g), valid)
        pad = (self.conv.kernel_size[0] - 1) // 2
        g = depthwise_conv_time(g, self.conv.weight, self.conv.bias, pad, pad, self.fast)  # (B, T, C)
        if self.linear_after_conv is not None:
            g = self.linear_after_conv(g)
        g = self.gate_activation(g)
        return self.linear_out(self.dropout(r * g))


def _build_norm(norm: Any, dim: int, eps: float) -> nn.Module:
    if norm is LayerNorm or norm == "LayerNorm":
        return LayerNorm(dim, eps=eps)
    return build_module(norm, None, dim=dim)
