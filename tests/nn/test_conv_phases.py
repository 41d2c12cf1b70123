"""The two-conv frontend block's gradients as products over stride phases (``nn.conv_phases``) against autograd."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer import Conv2dSubsampling
from ebranchformer.nn import conv_blocks
from ebranchformer.nn import linear as linear_mod
from ebranchformer.nn.conv_phases import two_conv_param_grads


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3), k0=st.sampled_from([1, 3]), s0=st.integers(1, 2), k=st.sampled_from([1, 2, 3, 5]),
    s1=st.integers(1, 3), extra_t=st.integers(0, 9), extra_f=st.integers(0, 9), c=st.integers(1, 5),
    c1=st.integers(1, 4), masked=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_two_conv_param_grads_equal_autograd(b, k0, s0, k, s1, extra_t, extra_f, c, c1, masked, seed):
    g = torch.Generator().manual_seed(seed)
    t1, f1 = k + extra_t, k + extra_f  # the first conv's output size: at least one output of the second
    t0, f0 = (t1 - 1) * s0 + k0, (f1 - 1) * s0 + k0
    x = torch.randn(b, 1, t0, f0, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.randn(c, 1, k0, k0, generator=g, dtype=torch.float64), torch.randn(c, generator=g).double()
    w1 = torch.randn(c1, c, k, k, generator=g, dtype=torch.float64)
    valid1 = torch.rand(b, t1, generator=g) > 0.3 if masked else None
    params = [p.clone().requires_grad_() for p in (w0, b0, w1)]
    h = F.relu(F.conv2d(x, params[0], params[1], s0))  # (B, C, T1, F1)
    if valid1 is not None:
        h = h * valid1[:, None, :, None]
    z = F.conv2d(h, params[2], None, s1).permute(0, 2, 3, 1)  # (B, r, F', C1)
    gz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad((z * gz).sum(), params)
    got = two_conv_param_grads(x, gz, w0, b0, w1, s0, s1, valid1)
    for a, e in zip(got, (*ref, gz.sum((0, 1, 2)))):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("onednn_mm", [True, False])
def test_float32_phase_products_on_onednn_and_on_torch_mm(onednn_mm):
    # float32 runs the products through nn.linear.mm / addmm_ (oneDNN where MKL is the slower): the same gradients
    # as float64 autograd within float32 rounding, on either path
    g = torch.Generator().manual_seed(3)
    b, s0, s1, k0, k, c, c1 = 2, 2, 2, 3, 3, 16, 24
    t1, f1 = 21, 13
    x = torch.randn(b, 1, (t1 - 1) * s0 + k0, (f1 - 1) * s0 + k0, generator=g, dtype=torch.float64)
    w0, b0 = torch.randn(c, 1, k0, k0, generator=g, dtype=torch.float64), torch.randn(c, generator=g).double()
    w1 = torch.randn(c1, c, k, k, generator=g, dtype=torch.float64) / 12
    valid1 = torch.arange(t1)[None, :] < torch.tensor([[t1], [15]])  # (B, T1)
    params = [p.clone().requires_grad_() for p in (w0, b0, w1)]
    h = F.relu(F.conv2d(x, params[0], params[1], s0)) * valid1[:, None, :, None]
    z = F.conv2d(h, params[2], None, s1).permute(0, 2, 3, 1)  # (B, r, F', C1)
    gz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad((z * gz).sum(), params)
    with mock.patch.object(linear_mod, "cpu_onednn_mm_faster", lambda: onednn_mm):
        got = two_conv_param_grads(*(v.float() for v in (x, gz, w0, b0, w1)), s0, s1, valid1)
    for a, e in zip(got, (*ref, gz.sum((0, 1, 2)))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-4)


def test_float32_two_conv_frontends_train_through_the_phase_products():
    # conv2d, conv2d2 and conv2d6 (two convs, one input channel first) in float32: every block's backward is
    # two_conv_param_grads; conv2d8 (three convs) keeps oneDNN's
    seen = []
    real = conv_blocks.two_conv_param_grads
    x, n = torch.randn(2, 90, 20), torch.tensor([90, 70])
    for kind, calls in (("conv2d", True), ("conv2d2", True), ("conv2d6", True), ("conv2d8", False)):
        sub = Conv2dSubsampling(20, 8, kind=kind).train()
        seen.clear()
        with mock.patch.object(conv_blocks, "two_conv_param_grads", lambda *a: seen.append(1) or real(*a)):
            sub(x, n)[0].sum().backward()
        assert bool(seen) == calls, kind
