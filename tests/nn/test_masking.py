"""The layers' input checks (``nn.masking.check_frames``): wrong shapes, dtypes and masks raise errors that name
the argument, instead of a broadcast or a bare error from inside torch."""

from __future__ import annotations

import pytest
import torch

from ebranchformer.nn import (
    ConformerLayer,
    EBranchformerLayer,
    FeedForward,
    FeedForwardConvGated,
    Merge,
    RelPosSelfAttention,
    SelfAttention,
)

D = 32


def _modules():
    torch.manual_seed(0)
    layer = dict(ff_dim=48, num_heads=4)
    return {
        "ebranchformer": EBranchformerLayer(D, cgmlp_ff_dim=40, cgmlp_conv_kernel=5, merge_conv_kernel=3, **layer),
        "conformer": ConformerLayer(D, conv_kernel_size=5, **layer),
        "relpos_attention": RelPosSelfAttention(D, 4),
        "attention": SelfAttention(D, 4),
        "cgmlp": FeedForwardConvGated(D, ff_dim=40, kernel_size=5),
        "merge": Merge(in_dim1=D, in_dim2=D, out_dim=D),
        "ffn": FeedForward(D, ff_dim=48),
    }


def _call(name, module, x, valid):
    if name == "merge":
        return module(x, x, valid)
    if name == "ffn":
        return module(x)
    return module(x, valid)


BAD = [
    ("x 2-D", lambda x, v: (x[0], v), ValueError, rf"x must have shape \(B, T, {D}\), got \(9, {D}\)"),
    ("x wrong D", lambda x, v: (x[..., :16], v), ValueError, rf"x must have shape \(B, T, {D}\), got \(2, 9, 16\)"),
    ("x integer", lambda x, v: (x.long(), v), TypeError, "x must be a floating-point tensor"),
    ("x list", lambda x, v: (x.tolist(), v), TypeError, "x must be a torch.Tensor"),
    ("x float64", lambda x, v: (x.double(), v), TypeError, "x has dtype torch.float64 but the module's parameters"),
    ("valid float", lambda x, v: (x, v.float()), TypeError, r"valid must be a bool tensor of shape \(B, T\) = \(2, 9\)"),
    ("valid other B", lambda x, v: (x, v[:1]), ValueError, r"valid must have shape \(B, T\) = \(2, 9\) as x, got \(1, 9\)"),
    ("valid other T", lambda x, v: (x, v[:, :5]), ValueError, r"valid must have shape .* got \(2, 5\)"),
]  # fmt: skip


CASES = [(name, *bad) for name in _modules() for bad in BAD if not (name == "ffn" and bad[0].startswith("valid"))]


@pytest.mark.parametrize("name, case, make, exc, match", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_named(name, case, make, exc, match):
    """(FeedForward takes no mask: only its x cases.)"""
    module = _modules()[name].eval()
    x, valid = make(torch.randn(2, 9, D), torch.ones(2, 9, dtype=torch.bool))
    if name == "merge":  # its inputs are a and g
        match = match.replace("x must", "a must").replace("x has", "a has").replace("as x", "as a")
    with pytest.raises(exc, match=match):
        _call(name, module, x, valid)


@pytest.mark.parametrize("name", ["ebranchformer", "conformer", "relpos_attention", "attention"])
def test_the_mask_is_required_where_keys_are_masked(name):
    with pytest.raises(TypeError, match=r"valid must be a bool tensor of shape \(B, T\) = \(2, 9\), got None"):
        _modules()[name].eval()(torch.randn(2, 9, D), None)


def test_merge_branches_must_agree():
    merge = _modules()["merge"]
    with pytest.raises(ValueError, match=r"a and g must have the same \(B, T\), got \(2, 9\) and \(2, 7\)"):
        merge(torch.randn(2, 9, D), torch.randn(2, 7, D))
    with pytest.raises(ValueError, match=rf"g must have shape \(B, T, {D}\)"):
        merge(torch.randn(2, 9, D), torch.randn(2, 9, 16))


@pytest.mark.parametrize("name", list(_modules()))
def test_good_input_and_autocast_pass(name):
    """The checks let through what the modules compute on: float32, and under autocast a bf16 input."""
    module = _modules()[name].eval()
    x, valid = torch.randn(2, 9, D), torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    with torch.no_grad():
        ref = _call(name, module, x, valid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = _call(name, module, x.bfloat16(), valid)
    assert ref.shape == (2, 9, D) and torch.isfinite(ref).all()
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()
