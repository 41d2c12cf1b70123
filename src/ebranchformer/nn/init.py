"""Named parameter-initialisation schemes for an encoder."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["INIT_SCHEMES", "init_parameters"]

INIT_SCHEMES = ("pytorch", "returnn", "espnet")


@torch.no_grad()
def init_parameters(module: nn.Module, scheme: str = "pytorch") -> None:
    """Initialise ``module`` in place.

    - ``"pytorch"``: leave PyTorch's defaults (kaiming-uniform Linear/Conv, fan-in uniform biases) and xavier
      ``pos_bias_u/v``: what ESPnet's recipes train with (``init: none``).
    - ``"returnn"``: Glorot-uniform weights (RETURNN's fans, which equal torch's xavier fans for these layouts),
      zero biases, LayerNorm 1/0.
    - ``"espnet"``: ESPnet's ``initialize(model, "xavier_uniform")``: xavier for every >= 2-D parameter, zero 1-D
      biases, norms reset, then the cgMLP gate init (conv weight ~ N(0, 1e-6), bias 1; likewise the optional
      Linear after the conv), so each cgMLP starts close to a plain gated-off-nothing MLP.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if scheme == "pytorch":
        return
    for name, p in module.named_parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            m.reset_parameters()
    if scheme == "espnet":
        from .cgmlp import FeedForwardConvGated

        for m in module.modules():
            if isinstance(m, FeedForwardConvGated):
                for lin in (m.conv, m.linear_after_conv):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=1e-6)
                        if lin.bias is not None:
                            nn.init.ones_(lin.bias)
