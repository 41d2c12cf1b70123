"""The E-Branchformer block: macaron FFN, parallel attention and cgMLP branches, merge, FFN, LayerNorm."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import ConfigBase, build_module, register
from .activations import activation_name
from .attention import RelPosSelfAttention
from .cgmlp import FeedForwardConvGated, check_odd_kernel
from .dropout import Dropout
from .feedforward import FeedForward
from .masking import check_frames
from .merge import Merge
from .norm import LayerNorm

__all__ = ["EBranchformerLayer", "EBranchformerLayerConfig"]


@dataclasses.dataclass(frozen=True)
class EBranchformerLayerConfig(ConfigBase):
    """Options of :class:`EBranchformerLayer` (the seed's names; None means "the default below")."""

    out_dim: int = 512  # model dim D (ESPnet output_size)
    ff: Any = None  # FFN spec: class / build_dict / module (Default FeedForward)
    ff_dim: int | None = None  # FFN hidden size (Default 4 * D; ESPnet linear_units)
    ff_activation: Any = None  # FFN activation (Default "swish")
    dropout: float = 0.1  # residual-branch dropout and FFN inner dropout
    num_heads: int = 4  # attention heads (ESPnet attention_heads)
    self_att: Any = None  # attention spec (Default RelPosSelfAttention)
    att_dropout: float = 0.1  # dropout on attention weights
    cgmlp: Any = None  # cgMLP spec (Default FeedForwardConvGated)
    cgmlp_ff_dim: int | None = None  # cgMLP gate size C (Default 3 * D; half of ESPnet cgmlp_linear_units)
    cgmlp_conv_kernel: int = 31  # odd depthwise kernel in the cgMLP
    merge_conv_kernel: int = 3  # odd depthwise kernel in the merge (paper recipes: 31)
    norm: Any = None  # norm spec (Default LayerNorm(D, eps=norm_eps))
    norm_eps: float = 1e-6  # LayerNorm epsilon (RETURNN 1e-6, ESPnet 1e-12)
    macaron_ffn: bool = True  # half-step FFN before the branches (ESPnet macaron_ffn)
    use_ffn: bool = True  # FFN after the merge (ESPnet use_ffn); scale 0.5 if macaron else 1.0
    dropout_broadcast: bool = False  # RETURNN feature-broadcast dropout

    def __post_init__(self) -> None:
        if not isinstance(self.out_dim, int) or self.out_dim <= 0:
            raise ValueError(f"out_dim must be a positive int, got {self.out_dim!r}")
        if not isinstance(self.num_heads, int) or self.num_heads <= 0 or self.out_dim % self.num_heads:
            raise ValueError(f"out_dim ({self.out_dim}) must be divisible by num_heads ({self.num_heads})")
        for name in ("ff_dim", "cgmlp_ff_dim"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        check_odd_kernel("cgmlp_conv_kernel", self.cgmlp_conv_kernel)
        check_odd_kernel("merge_conv_kernel", self.merge_conv_kernel)
        for name in ("dropout", "att_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.macaron_ffn and not self.use_ffn:
            raise ValueError("macaron_ffn=True needs use_ffn=True (as in ESPnet)")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.ff_activation is not None:
            object.__setattr__(self, "ff_activation", activation_name(self.ff_activation))


@register
class EBranchformerLayer(nn.Module):
    """E-Branchformer layer (Kim et al. 2022), to be used in :class:`~ebranchformer.nn.ConformerEncoder`.

    ::

        x = x + s * drop(FFN1(LN(x)))                    # macaron half-step (s = 0.5), if macaron_ffn
        a = drop(MHSA(LN(x)))                            # global branch
        g = drop(cgMLP(LN(x)))                           # local branch, same input
        x = x + drop(Merge(a, g))
        x = x + s * drop(FFN2(LN(x)))                    # if use_ffn (s = 1.0 without macaron)
        y = LN(x)

    Args are those of :class:`EBranchformerLayerConfig` (the seed's ``returnn.frontend.encoder.e_branchformer``
    options with RETURNN's defaults: ff_dim ``4*D``, cgmlp_ff_dim ``3*D``, merge_conv_kernel ``3``).

    Forward: ``(x (B, T, D), valid (B, T) bool, *, mask_convs=True) -> (B, T, D)``. With ``mask_convs``, padded
    frames are zeroed before the cgMLP and merge convolutions; with False they leak in as in ESPnet <= 202511.

    Example:
        >>> layer = EBranchformerLayer(256, ff_dim=1024, num_heads=4, cgmlp_ff_dim=512, merge_conv_kernel=31)
        >>> x, valid = torch.randn(2, 50, 256), torch.ones(2, 50, dtype=torch.bool)
        >>> layer(x, valid).shape
        torch.Size([2, 50, 256])
    """

    config_class = EBranchformerLayerConfig  # its fields are the options (config.check_spec)

    def __init__(self, out_dim: int = 512, **opts: Any) -> None:
        super().__init__()
        cfg = EBranchformerLayerConfig(out_dim=out_dim, **opts)
        self.config = cfg
        d = cfg.out_dim
        drop_opts = dict(dropout=cfg.dropout, dropout_broadcast=cfg.dropout_broadcast)
        ff_opts = dict(out_dim=d, ff_dim=cfg.ff_dim, activation=cfg.ff_activation or "swish", **drop_opts)
        self.ff_scale = 0.5 if cfg.macaron_ffn else 1.0
        if cfg.macaron_ffn:
            self.ffn1 = build_module(cfg.ff, FeedForward, **ff_opts)
            self.ffn1_layer_norm = self._norm()
        if cfg.use_ffn:
            self.ffn2 = build_module(cfg.ff, FeedForward, **ff_opts)
            if cfg.macaron_ffn and self.ffn2 is self.ffn1:  # a given module is a template: each FFN gets a copy
                self.ffn2 = copy.deepcopy(self.ffn1)
            self.ffn2_layer_norm = self._norm()
        self.self_att = build_module(
            cfg.self_att, RelPosSelfAttention, dim=d, num_heads=cfg.num_heads, att_dropout=cfg.att_dropout
        )
        self.self_att_layer_norm = self._norm()
        self.cgmlp = build_module(
            cfg.cgmlp, FeedForwardConvGated, out_dim=d, ff_dim=cfg.cgmlp_ff_dim,
            kernel_size=cfg.cgmlp_conv_kernel, norm_eps=cfg.norm_eps, **drop_opts,
        )  # fmt: skip
        self.cgmlp_layer_norm = self._norm()
        self.merge = Merge(in_dim1=d, in_dim2=d, out_dim=d, merge_conv_kernel=cfg.merge_conv_kernel)
        self.final_layer_norm = self._norm()
        self.dropout = Dropout(cfg.dropout, cfg.dropout_broadcast)

    def _norm(self) -> nn.Module:
        norm = self.config.norm
        if norm is None or norm is LayerNorm or norm == "LayerNorm":
            return LayerNorm(self.config.out_dim, eps=self.config.norm_eps)
        return build_module(norm, None, dim=self.config.out_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, *, mask_convs: bool = True) -> torch.Tensor:
        check_frames(x, valid, self.config.out_dim, like=next(self.parameters(), None))
        conv_valid = valid if mask_convs else None
        if self.config.macaron_ffn:
            x = torch.add(x, self.dropout(self.ffn1(self.ffn1_layer_norm(x))), alpha=self.ff_scale)  # one pass
        a = self.dropout(self.self_att(self.self_att_layer_norm(x), valid))
        g = self.dropout(self.cgmlp(self.cgmlp_layer_norm(x), conv_valid))
        x = x + self.dropout(self.merge(a, g, conv_valid))
        if self.config.use_ffn:
            x = torch.add(x, self.dropout(self.ffn2(self.ffn2_layer_norm(x))), alpha=self.ff_scale)  # one pass
        return self.final_layer_norm(x)
