"""Position-wise feed-forward block: Linear -> activation -> dropout -> Linear."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import register
from .activations import get_activation
from .dropout import Dropout
from .linear import Linear
from .masking import check_frames

__all__ = ["FeedForward"]


@register
class FeedForward(nn.Module):
    """``linear_out(dropout(activation(linear_ff(x))))`` (ESPnet ``PositionwiseFeedForward``, RETURNN
    ``ConformerPositionwiseFeedForward``).

    Args:
        out_dim: model dim D.
        ff_dim: hidden size F (Default: ``4 * out_dim``).
        dropout: dropout after the activation (Default: ``0.1``).
        activation: name or callable (Default: ``"swish"``).
        with_bias: bias in both Linear layers (Default: ``True``).
        dropout_broadcast: RETURNN-style feature-broadcast dropout (Default: ``False``).

    Input and output: (B, T, D).

    Example:
        >>> ff = FeedForward(256, ff_dim=1024)
        >>> ff(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(
        self,
        out_dim: int,
        *,
        ff_dim: int | None = None,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "swish",
        with_bias: bool = True,
        dropout_broadcast: bool = False,
    ) -> None:
        super().__init__()
        ff_dim = 4 * out_dim if ff_dim is None else int(ff_dim)
        if out_dim <= 0 or ff_dim <= 0:
            raise ValueError(f"out_dim and ff_dim must be positive, got out_dim={out_dim}, ff_dim={ff_dim}")
        self.linear_ff = Linear(out_dim, ff_dim, bias=with_bias)
        self.activation = get_activation(activation)
        self.dropout = Dropout(dropout, dropout_broadcast)
        self.linear_out = Linear(ff_dim, out_dim, bias=with_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_frames(x, None, self.linear_ff.in_features, like=self.linear_ff.weight, valid_optional=True)
        return self.linear_out(self.dropout(self.linear_ff.act(x, self.activation)))
