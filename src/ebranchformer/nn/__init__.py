"""Neural-network building blocks of the E-Branchformer (and Conformer) encoder."""

from ..config import build_dict
from .attention import RelPosSelfAttention, SelfAttention
from .cgmlp import FeedForwardConvGated
from .conformer_layer import ConformerLayer, ConformerLayerConfig
from .conv_subsample import ConformerConvSubsample
from .dropout import Dropout
from .ebranchformer_layer import EBranchformerLayer, EBranchformerLayerConfig
from .encoder import ConformerEncoder, EncoderConfig
from .feedforward import FeedForward
from .linear import Linear
from .merge import Merge
from .norm import LayerNorm
from .subsampling import Conv2dSubsampling, FrameStacking, LinearInput

__all__ = [
    "ConformerConvSubsample",
    "ConformerEncoder",
    "ConformerLayer",
    "ConformerLayerConfig",
    "Conv2dSubsampling",
    "Dropout",
    "EBranchformerLayer",
    "EBranchformerLayerConfig",
    "EncoderConfig",
    "FeedForward",
    "FeedForwardConvGated",
    "FrameStacking",
    "LayerNorm",
    "Linear",
    "LinearInput",
    "Merge",
    "RelPosSelfAttention",
    "SelfAttention",
    "build_dict",
]
