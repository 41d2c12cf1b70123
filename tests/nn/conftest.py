from __future__ import annotations

import pytest
import torch

from ebranchformer import ConformerEncoder, Conv2dSubsampling, EBranchformerLayer, build_dict


def perturb_(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every 1-D parameter (biases, LayerNorm gains) away from its init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def small_encoder(input_layer=None, in_dim=24, out_dim=32, num_layers=2, **opts) -> ConformerEncoder:
    layer = build_dict(
        EBranchformerLayer, ff_dim=48, num_heads=4, cgmlp_ff_dim=40, cgmlp_conv_kernel=5, merge_conv_kernel=3
    )
    kwargs = dict(in_dim=in_dim, out_dim=out_dim, num_layers=num_layers, input_layer=input_layer, encoder_layer=layer)
    return ConformerEncoder(**{**kwargs, **opts})


@pytest.fixture
def conv_encoder() -> ConformerEncoder:
    torch.manual_seed(0)
    return perturb_(small_encoder(build_dict(Conv2dSubsampling, kind="conv2d")))
