"""E-Branchformer speech encoders, exact to ESPnet and RETURNN.

Example (the seed's usage pattern):
    >>> from ebranchformer import ConformerEncoder, EBranchformerLayer, build_dict
    >>> enc = ConformerEncoder(in_dim=80, out_dim=256, num_layers=12, input_layer=None,
    ...     encoder_layer=build_dict(EBranchformerLayer, ff_dim=1024, num_heads=4, cgmlp_ff_dim=512,
    ...                              cgmlp_conv_kernel=31, merge_conv_kernel=31))

The names below are imported on first use, so ``import ebranchformer.asr.onnx_runtime`` (the numpy + onnxruntime
inference path) does not import torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_dict": "ebranchformer.config",
    **{
        name: "ebranchformer.nn"
        for name in (
            "ConformerConvSubsample", "ConformerEncoder", "ConformerLayer", "Conv2dSubsampling", "EBranchformerLayer",
            "EncoderConfig", "FeedForward", "FeedForwardConvGated", "FrameStacking", "LayerNorm", "LinearInput",
            "Merge", "RelPosSelfAttention", "SelfAttention",
        )
    },
}  # fmt: skip

__all__ = sorted([*_LAZY, "load"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ebranchformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a model directory: a full CTC model (``CTCModel``) or an encoder-only one (``ConformerEncoder``)."""
    from .interop.encoder_dir import load_encoder, read_dir_format

    if read_dir_format(path) == "ebranchformer-encoder":
        return load_encoder(path, map_location=map_location)
    from .asr.model_dir import load_model

    return load_model(path, map_location=map_location)
