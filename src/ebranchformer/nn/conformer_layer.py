"""The standard Conformer block (Gulati et al. 2020), RETURNN's ``ConformerEncoderLayer`` defaults."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigBase, build_module, register
from .activations import activation_name
from .attention import RelPosSelfAttention
from .dropout import Dropout
from .dwconv import depthwise_conv_time
from .feedforward import FeedForward
from .linear import Linear
from .masking import check_frames, mask_padded
from .norm import LayerNorm

__all__ = ["ConformerConvModule", "ConformerLayer", "ConformerLayerConfig", "MaskedBatchNorm"]


class MaskedBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature axis of (B, T, D) whose training statistics use only valid frames.

    Args: ``dim``, ``eps`` (Default ``1e-3``, RETURNN's), ``momentum`` (Default ``0.1``).
    Forward: ``(x (B, T, D), valid (B, T) or None) -> (B, T, D)``; in eval mode the running statistics are used.
    """

    def __init__(self, dim: int, eps: float = 1e-3, momentum: float = 0.1) -> None:
        super().__init__(dim, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if not self.training or valid is None:
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        frames = x[valid]  # (N, D), the valid frames only
        mean = frames.mean(0)  # (D,)
        var = frames.var(0, unbiased=False)  # (D,)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var)  # biased, as RETURNN's rf.BatchNorm
            self.num_batches_tracked.add_(1)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias


@register
class ConformerConvModule(nn.Module):
    """``Linear(D, 2D) -> GLU -> depthwise conv_K -> norm -> swish -> Linear(D, D)`` over (B, T, D).

    Args: ``dim``, ``kernel_size`` (Default ``32``, RETURNN's; even sizes pad ``(k-1)//2`` left),
    ``norm`` ("batch" (Default) or "layer"), ``norm_eps`` (Default ``1e-3`` for batch norm).
    Forward: ``(x (B, T, D), valid (B, T) or None)``; with ``valid`` padded frames are zeroed before the conv.
    """

    def __init__(self, dim: int, kernel_size: int = 32, norm: str = "batch", norm_eps: float = 1e-3) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv_kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.positionwise_conv1 = Linear(dim, 2 * dim)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel_size, groups=dim)
        if norm == "batch":
            self.norm: nn.Module = MaskedBatchNorm(dim, eps=norm_eps)
        elif norm == "layer":
            self.norm = LayerNorm(dim, eps=norm_eps)
        else:
            raise ValueError(f"conv_norm must be 'batch' or 'layer', got {norm!r}")
        self.positionwise_conv2 = Linear(dim, dim)
        self.fast = True  # channels-last depthwise conv

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        a, b = self.positionwise_conv1(x).chunk(2, dim=-1)  # (B, T, D) each
        h = mask_padded(a * torch.sigmoid(b), valid)
        left = (self.kernel_size - 1) // 2
        w, b = self.depthwise_conv.weight, self.depthwise_conv.bias
        h = depthwise_conv_time(h, w, b, left, self.kernel_size - 1 - left, self.fast)  # (B, T, D)
        h = self.norm(h, valid) if isinstance(self.norm, MaskedBatchNorm) else self.norm(h)
        return self.positionwise_conv2(F.silu(h))


@dataclasses.dataclass(frozen=True)
class ConformerLayerConfig(ConfigBase):
    """Options of :class:`ConformerLayer` (RETURNN ``ConformerEncoderLayer`` names and defaults)."""

    out_dim: int = 512  # model dim D
    ff: Any = None  # FFN spec (Default FeedForward)
    ff_dim: int | None = None  # FFN hidden size (Default 4 * D)
    ff_activation: Any = None  # FFN activation (Default "swish")
    dropout: float = 0.1
    conv_kernel_size: int = 32  # depthwise kernel (RETURNN default 32; ESPnet recipes 31)
    conv_norm: str = "batch"  # "batch" or "layer"
    conv_norm_eps: float = 1e-3  # RETURNN BatchNorm epsilon
    num_heads: int = 4
    self_att: Any = None  # attention spec (Default RelPosSelfAttention)
    att_dropout: float = 0.1
    norm_eps: float = 1e-6  # LayerNorm epsilon
    dropout_broadcast: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.out_dim, int) or self.out_dim <= 0:
            raise ValueError(f"out_dim must be a positive int, got {self.out_dim!r}")
        if not isinstance(self.num_heads, int) or self.num_heads <= 0 or self.out_dim % self.num_heads:
            raise ValueError(f"out_dim ({self.out_dim}) must be divisible by num_heads ({self.num_heads})")
        if not isinstance(self.conv_kernel_size, int) or self.conv_kernel_size < 1:
            raise ValueError(f"conv_kernel_size must be a positive int, got {self.conv_kernel_size!r}")
        if self.conv_norm not in ("batch", "layer"):
            raise ValueError(f"conv_norm must be 'batch' or 'layer', got {self.conv_norm!r}")
        for name in ("dropout", "att_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.ff_activation is not None:
            object.__setattr__(self, "ff_activation", activation_name(self.ff_activation))


@register
class ConformerLayer(nn.Module):
    """Conformer block: ``x + ½FFN``, ``+ MHSA``, ``+ Conv``, ``+ ½FFN``, then LayerNorm (each branch pre-normed).

    Args are those of :class:`ConformerLayerConfig`. Forward: ``(x (B, T, D), valid (B, T), *, mask_convs=True)``.

    Example:
        >>> layer = ConformerLayer(256, ff_dim=1024, num_heads=4, conv_kernel_size=31)
        >>> layer(torch.randn(2, 40, 256), torch.ones(2, 40, dtype=torch.bool)).shape
        torch.Size([2, 40, 256])
    """

    config_class = ConformerLayerConfig  # its fields are the options (config.check_spec)

    def __init__(self, out_dim: int = 512, **opts: Any) -> None:
        super().__init__()
        cfg = ConformerLayerConfig(out_dim=out_dim, **opts)
        self.config = cfg
        d = cfg.out_dim
        ff_opts = dict(
            out_dim=d, ff_dim=cfg.ff_dim, activation=cfg.ff_activation or "swish",
            dropout=cfg.dropout, dropout_broadcast=cfg.dropout_broadcast,
        )  # fmt: skip
        self.ffn1 = build_module(cfg.ff, FeedForward, **ff_opts)
        self.ffn2 = build_module(cfg.ff, FeedForward, **ff_opts)
        if self.ffn2 is self.ffn1:
            import copy

            self.ffn2 = copy.deepcopy(self.ffn1)
        self.ffn1_layer_norm, self.ffn2_layer_norm = LayerNorm(d, cfg.norm_eps), LayerNorm(d, cfg.norm_eps)
        self.self_att = build_module(
            cfg.self_att, RelPosSelfAttention, dim=d, num_heads=cfg.num_heads, att_dropout=cfg.att_dropout
        )
        self.self_att_layer_norm = LayerNorm(d, cfg.norm_eps)
        self.conv_block = ConformerConvModule(d, cfg.conv_kernel_size, cfg.conv_norm, cfg.conv_norm_eps)
        self.conv_layer_norm = LayerNorm(d, cfg.norm_eps)
        self.final_layer_norm = LayerNorm(d, cfg.norm_eps)
        self.dropout = Dropout(cfg.dropout, cfg.dropout_broadcast)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, *, mask_convs: bool = True) -> torch.Tensor:
        check_frames(x, valid, self.config.out_dim, like=next(self.parameters(), None))
        x = torch.add(x, self.dropout(self.ffn1(self.ffn1_layer_norm(x))), alpha=0.5)  # one pass
        x = x + self.dropout(self.self_att(self.self_att_layer_norm(x), valid))
        x = x + self.dropout(self.conv_block(self.conv_layer_norm(x), valid if mask_convs else None))
        x = torch.add(x, self.dropout(self.ffn2(self.ffn2_layer_norm(x))), alpha=0.5)  # one pass
        return self.final_layer_norm(x)
