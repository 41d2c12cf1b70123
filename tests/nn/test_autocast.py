import threading
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ebranchformer import ConformerConvSubsample, Conv2dSubsampling, build_dict
from ebranchformer.nn import autocast as autocast_mod
from ebranchformer.nn import linear as linear_mod
from ebranchformer.nn.autocast import conv2d, cpu_autocast_dtype, cpu_bf16_emulated

from .conftest import perturb_, small_encoder


def test_cpu_autocast_dtype_follows_this_threads_autocast():
    assert cpu_autocast_dtype() is None
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_autocast_dtype() is torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert cpu_autocast_dtype() is None
        thread = threading.Thread(target=lambda: seen.append(cpu_autocast_dtype()))
        thread.start()
        thread.join()
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert cpu_autocast_dtype() is None  # another device's autocast
    assert seen == [None]  # autocast is thread-local


# A CPU without oneDNN's bf16 kernels (AVX2 only), emulated by patching the query: the convolutions must reach torch
# as float32 ones (torch's bf16 fallback is its slow reference kernel there), with bf16 values.
def _no_onednn_bf16(monkeypatch):
    monkeypatch.setattr(autocast_mod, "cpu_onednn_bf16", lambda: False)
    monkeypatch.setattr(linear_mod, "cpu_onednn_bf16", lambda: False)


class _ConvDtypes(TorchDispatchMode):
    """Records the input dtype of every convolution (forward and backward) that reaches torch's kernels."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            self.seen.append((func.overloadpacket.__name__, args[0].dtype))
        return func(*args, **(kwargs or {}))


@settings(max_examples=20, deadline=None)
@given(
    cin=st.sampled_from([1, 3, 8]),
    stride=st.sampled_from([1, 2, (2, 1)]),
    padding=st.sampled_from([0, 1]),
    channels_last=st.booleans(),
    under_autocast=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_without_onednn_bf16_is_the_float32_conv_of_the_rounded_operands(
    cin, stride, padding, channels_last, under_autocast, seed
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, 11, 9, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, cin, 3, 3, generator=g), torch.randn(6, generator=g)
    rounded = [t.to(torch.bfloat16).float() for t in (x, w, b)]
    expected = F.conv2d(*rounded, stride, padding).to(torch.bfloat16)
    with mock.patch.object(autocast_mod, "cpu_onednn_bf16", lambda: False), _ConvDtypes() as mode:
        if under_autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv2d(x, w, b, stride, padding)
        else:
            y = conv2d(x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16), stride, padding)
    assert mode.seen == [("convolution", torch.float32)]
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert y.stride() == expected.stride()  # the layout F.conv2d gives the input (channels-last stays so)
    # against the exact conv of the rounded operands: one bf16 rounding of the output (2^-8 relative)
    exact = F.conv2d(*(t.double() for t in rounded), stride=stride, padding=padding)
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


def test_conv2d_keeps_float32_and_native_bf16_convs_as_they_are(monkeypatch):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    monkeypatch.setattr(autocast_mod, "cpu_onednn_bf16", lambda: True)
    with _ConvDtypes() as mode:
        assert torch.equal(conv2d(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv2d(x, w).dtype == torch.bfloat16
    assert mode.seen == [("convolution", torch.float32)] * 2 + [("convolution", torch.bfloat16)]  # ours, F.conv2d, ours
    monkeypatch.setattr(autocast_mod, "cpu_onednn_bf16", lambda: False)
    assert not cpu_bf16_emulated(x)  # float32 outside autocast: nothing to emulate
    with torch.autocast("cpu", dtype=torch.float16):
        assert not cpu_bf16_emulated(x)


_FRONTENDS = {
    "conv2d": lambda: build_dict(Conv2dSubsampling, kind="conv2d"),
    "conv6": lambda: build_dict(ConformerConvSubsample, out_dims=[8, 8], filter_sizes=[3, 3], pool_sizes=[(1, 2)],
                                strides=[1, (2, 1)]),  # fmt: skip
}


@pytest.mark.parametrize("frontend", list(_FRONTENDS))
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_bf16_encoder_without_onednn_bf16_runs_float32_convs_with_bf16_values(monkeypatch, train, frontend):
    """The frontends' convs (conv2d's blocked ones, RETURNN's conv6) and the cgMLP/merge depthwise convs, forward
    and backward: no bf16
    convolution reaches torch, and the outputs (and gradients) equal those of the native bf16 kernels within bf16's
    rounding (the bound of ``test_bf16_autocast_within_documented_bound``)."""
    torch.manual_seed(0)
    enc = perturb_(small_encoder(_FRONTENDS[frontend]())).train(train)
    x, n = torch.randn(3, 70, 24), torch.tensor([70, 50, 33])

    def run():
        torch.manual_seed(1)  # the same dropout masks in both runs
        enc.zero_grad()
        with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
            y, yl = enc(x, n)
        if train:
            y.float().square().sum().backward()
        return y.float(), {k: p.grad.clone() for k, p in enc.named_parameters() if train and p.grad is not None}

    ref, ref_grads = run()  # this CPU's own kernels (native bf16 where oneDNN has them)
    _no_onednn_bf16(monkeypatch)
    with _ConvDtypes() as mode:
        low, grads = run()
    assert mode.seen and {dtype for _, dtype in mode.seen} == {torch.float32}
    assert {name for name, _ in mode.seen} == ({"convolution", "convolution_backward"} if train else {"convolution"})
    diff = (low - ref).abs()
    assert diff.max() < 0.06 and diff.mean() < 0.009
    for k, g in ref_grads.items():
        assert torch.isfinite(grads[k]).all()
        assert (grads[k] - g).abs().max() <= 0.05 * g.abs().max() + 1e-3, k
