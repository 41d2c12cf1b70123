"""E-Branchformer speech encoders, exact to ESPnet and RETURNN.

Example (the seed's usage pattern):
    >>> from ebranchformer import ConformerEncoder, EBranchformerLayer, build_dict
    >>> enc = ConformerEncoder(in_dim=80, out_dim=256, num_layers=12, input_layer=None,
    ...     encoder_layer=build_dict(EBranchformerLayer, ff_dim=1024, num_heads=4, cgmlp_ff_dim=512,
    ...                              cgmlp_conv_kernel=31, merge_conv_kernel=31))
"""

from .asr.model_dir import load_model as load
from .config import build_dict
from .nn import (
    ConformerConvSubsample,
    ConformerEncoder,
    ConformerLayer,
    Conv2dSubsampling,
    EBranchformerLayer,
    EncoderConfig,
    FeedForward,
    FeedForwardConvGated,
    FrameStacking,
    LayerNorm,
    LinearInput,
    Merge,
    RelPosSelfAttention,
    SelfAttention,
)

__version__ = "0.1.0"

__all__ = [
    "ConformerConvSubsample",
    "ConformerEncoder",
    "ConformerLayer",
    "Conv2dSubsampling",
    "EBranchformerLayer",
    "EncoderConfig",
    "FeedForward",
    "FeedForwardConvGated",
    "FrameStacking",
    "LayerNorm",
    "LinearInput",
    "Merge",
    "RelPosSelfAttention",
    "SelfAttention",
    "build_dict",
    "load",
]
