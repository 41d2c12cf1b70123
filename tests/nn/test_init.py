"""Named init schemes: PyTorch defaults (ESPnet recipes), RETURNN's Glorot, ESPnet's xavier + cgMLP gate init."""

from __future__ import annotations

import math

import pytest
import torch

from ebranchformer.nn.init import init_parameters

from .conftest import small_encoder


def test_returnn_scheme_is_glorot_with_zero_biases():
    enc = small_encoder(init="returnn")
    for name, p in enc.named_parameters():
        if p.dim() > 1:
            fan_out, fan_in = p.shape[0], p.shape[1]
            rf = p[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in * rf + fan_out * rf))
            assert p.abs().max() <= bound + 1e-7, name
            assert p.abs().max() > 0.5 * bound, name  # uniform over the whole range, not a tiny init
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # LayerNorm gains
            assert torch.all(p == 1), name


def test_espnet_scheme_starts_the_cgmlp_gate_near_one():
    enc = small_encoder(init="espnet")
    for layer in enc.layers:
        conv = layer.cgmlp.conv
        assert conv.weight.abs().max() < 1e-4 and torch.all(conv.bias == 1)
        assert torch.all(layer.merge.merge_proj.bias == 0)


def test_pytorch_scheme_keeps_defaults():
    torch.manual_seed(3)
    a = small_encoder()
    torch.manual_seed(3)
    b = small_encoder(init="pytorch")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert any(p.abs().sum() > 0 for n, p in a.named_parameters() if n.endswith("bias"))


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="init must be one of"):
        init_parameters(small_encoder(), "kaiming")
