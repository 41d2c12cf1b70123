"""Every fast path equals the plain path: fused SDPA attention, strided rel-shift, split merge, torch.compile,
torch.export, and bf16 autocast within a documented bound."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ebranchformer import (
    ConformerConvSubsample,
    Conv2dSubsampling,
    Merge,
    RelPosSelfAttention,
    SelfAttention,
    build_dict,
)
from ebranchformer.nn import subsampling
from ebranchformer.nn.attention import rel_shift
from ebranchformer.nn.linear import onednn_float32

from ..asr.ctc_corpus import torch_threads
from .conftest import perturb_, small_encoder


def _valid(lengths, t):
    return torch.arange(t)[None] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "make",
    [
        lambda: RelPosSelfAttention(48, 4),
        lambda: RelPosSelfAttention(48, 6, zero_triu=True),
        lambda: RelPosSelfAttention(48, 4, legacy=True, legacy_max_len=100),
        lambda: SelfAttention(48, 4, qk_norm=True),
    ],
)
def test_attention_fast_equals_plain(make, dtype, tol):
    att = perturb_(make()).to(dtype).eval()
    x = torch.randn(3, 17, 48, dtype=dtype)
    valid = _valid([17, 9, 1], 17)
    with torch.no_grad():
        att.fast = True
        fast = att(x, valid)
        att.fast = False
        plain = att(x, valid)
    torch.testing.assert_close(fast, plain, atol=tol, rtol=0)


def test_rel_shift_strided_view_equals_gather():
    bd = torch.randn(2, 3, 7, 13)
    assert torch.equal(rel_shift(bd, fast=True), rel_shift(bd, fast=False))
    i, j = 4, 1
    assert rel_shift(bd)[1, 2, i, j] == bd[1, 2, i, 7 - 1 - i + j]
    g = torch.randn(2, 3, 7, 7)
    bd1 = bd.clone().requires_grad_()
    bd2 = bd.clone().requires_grad_()
    (rel_shift(bd1, True) * g).sum().backward()
    (rel_shift(bd2, False) * g).sum().backward()
    assert torch.equal(bd1.grad, bd2.grad)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_split_merge_equals_concat_merge(dtype, tol):
    m = perturb_(Merge(in_dim1=16, in_dim2=24, out_dim=20, merge_conv_kernel=5)).to(dtype)
    a, g = torch.randn(2, 11, 16, dtype=dtype), torch.randn(2, 11, 24, dtype=dtype)
    for valid in (None, _valid([11, 6], 11)):
        m.fast = True
        fast = m(a, g, valid)
        m.fast = False
        torch.testing.assert_close(fast, m(a, g, valid), atol=tol, rtol=0)


def _fast_and_plain_step(enc, x, n, seed=None):
    """Output and all gradients of ``enc`` on the fast and on the plain path (``seed``: the same dropout masks)."""
    outs, grads = [], []
    for fast in (True, False):
        enc.set_fast_path(fast).zero_grad()
        if seed is not None:
            torch.manual_seed(seed)
        y, _ = enc(x, n)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-4)
    return outs[0]


def test_encoder_fast_equals_plain_forward_and_backward(conv_encoder):
    _fast_and_plain_step(conv_encoder.eval(), torch.randn(3, 70, 24), torch.tensor([70, 50, 33]))


def test_cpu_training_fast_path_equals_plain_with_dropout(conv_encoder):
    enc = conv_encoder.train()  # dropout 0.1 everywhere, attention dropout included
    x, n = torch.randn(3, 70, 24), torch.tensor([70, 50, 33])
    y = _fast_and_plain_step(enc, x, n, seed=5)
    assert not torch.equal(y, enc.eval()(x, n)[0])  # dropout was active


# Measured |bf16 - fp32| on the unit-scale (LayerNorm) outputs of this 2-layer model over 3 seeds (float32 residual
# stream under autocast): max 0.014-0.020, mean 0.0026-0.0029. The bound leaves about 3x headroom.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.06, 0.009


def test_bf16_autocast_within_documented_bound(conv_encoder):
    enc = conv_encoder.eval()
    x, n = torch.randn(3, 70, 24), torch.tensor([70, 50, 33])
    with torch.no_grad():
        ref, yl = enc(x, n)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, yl2 = enc(x, n)
    assert torch.equal(yl, yl2) and torch.isfinite(low).all()
    assert low.dtype == torch.float32  # the residual stream (and the output) stay float32 under autocast
    valid = _valid(yl.tolist(), ref.shape[1])
    diff = (low.float() - ref).abs()[valid]
    assert diff.max() < BF16_MAX_ABS and diff.mean() < BF16_MEAN_ABS


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    enc = perturb_(small_encoder(build_dict(Conv2dSubsampling, kind="conv2d"), num_layers=1)).eval()
    compiled = torch.compile(enc, dynamic=True)
    with torch.no_grad():
        for t, lengths in ((50, [50, 31]), (63, [63, 40])):
            x = torch.randn(2, t, 24)
            n = torch.tensor(lengths)
            y, yl = compiled(x, n)
            y_ref, yl_ref = enc(x, n)
            assert torch.equal(yl, yl_ref)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)


def test_no_graph_breaks_under_dynamo(conv_encoder):
    import torch._dynamo

    x, n = torch.randn(2, 40, 24), torch.tensor([40, 30])
    conv_encoder.set_cpu_blocks(False)  # their block loops depend on T' (documented)
    for mode in (conv_encoder.eval, conv_encoder.train):
        mode()
        explained = torch._dynamo.explain(conv_encoder)(x, n)
        assert explained.graph_break_count == 0, explained.break_reasons


def test_torch_export_with_dynamic_batch_and_time(conv_encoder):
    enc = conv_encoder.eval()
    batch, time = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("time", min=16, max=20000)
    ep = torch.export.export(
        enc, (torch.randn(3, 50, 24), torch.tensor([50, 40, 30])), dynamic_shapes=({0: batch, 1: time}, {0: batch})
    )
    with torch.no_grad():
        for b, t in ((1, 33), (5, 91)):
            x = torch.randn(b, t, 24)
            n = torch.randint(16, t + 1, (b,))
            n[0] = t
            y, yl = ep.module()(x, n)
            y_ref, yl_ref = enc(x, n)
            assert torch.equal(yl, yl_ref)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])  # one thread: the weight gradient is weight_grad_blocked's
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: oneDNN's kernels
@pytest.mark.parametrize("k, left, right", [(1, 0, 0), (5, 2, 2), (4, 1, 2), (31, 15, 15)])
def test_channels_last_depthwise_conv_equals_conv1d(k, left, right, dtype, threads):
    with torch_threads(threads):
        _check_depthwise_conv_equals_conv1d(k, left, right, dtype)


def _check_depthwise_conv_equals_conv1d(k, left, right, dtype):
    from ebranchformer.nn.dwconv import depthwise_conv_time

    tol_y, tol = (1e-12, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)  # outputs about 3, gradients 100
    x = torch.randn(2, 19, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 1, k, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)  # a trained bias: the backward with the split bias gradient
    fast = depthwise_conv_time(x, w, b, left, right, fast=True)
    plain = depthwise_conv_time(x, w, b, left, right, fast=False)
    torch.testing.assert_close(fast, plain, atol=tol_y, rtol=0)
    gf = torch.autograd.grad(fast.pow(2).sum(), (x, w, b))
    gp = torch.autograd.grad(plain.pow(2).sum(), (x, w, b))
    for a, c in zip(gf, gp):
        torch.testing.assert_close(a, c, atol=tol, rtol=0)
    # only some of the three gradients asked for
    for wanted in ((x,), (w,), (b,), (w, b)):
        for a, c in zip(torch.autograd.grad(depthwise_conv_time(x, w, b, left, right).pow(2).sum(), wanted), (
            gp[{id(x): 0, id(w): 1, id(b): 2}[id(t)]] for t in wanted
        )):
            torch.testing.assert_close(a, c, atol=tol, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), c=st.integers(1, 9), t_in=st.integers(1, 90), k=st.integers(1, 33), pad=st.integers(0, 16),
    channels_last=st.booleans(),
)  # fmt: skip
def test_blocked_depthwise_weight_grad_equals_conv1d(b, c, t_in, k, pad, channels_last):
    from ebranchformer.nn.dwconv import weight_grad_blocked

    t_out = t_in + 2 * pad - k + 1
    assume(t_out >= 1)
    x = torch.randn(b, c, t_in, dtype=torch.float64)
    w = torch.randn(c, 1, k, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(b, c, t_out, dtype=torch.float64)
    (ref,) = torch.autograd.grad(F.conv1d(x, w, padding=pad, groups=c), w, gy)  # (C, 1, K)
    if channels_last:  # strides of the (B, T, C) activations, as the channels-last conv hands them over
        x, gy = x.transpose(1, 2).contiguous().transpose(1, 2), gy.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(weight_grad_blocked(gy, x, pad, k), ref[:, 0], atol=1e-10, rtol=0)


def test_blocked_depthwise_weight_grad_checks_its_shapes():
    from ebranchformer.nn.dwconv import weight_grad_blocked

    with pytest.raises(ValueError, match="gy has 10 frames, expected 12"):
        weight_grad_blocked(torch.zeros(1, 2, 10), torch.zeros(1, 2, 12), 1, 3)


@pytest.mark.parametrize("channels", [1, 2, 4, 16, 31])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast", [True, False])
def test_half_precision_depthwise_conv_with_few_channels(dtype, channels, fast):
    # oneDNN's half-precision depthwise conv hangs for 2-16 channels (bf16 channels-last; fp16 in any layout on an
    # AVX512-FP16 CPU): such convs run in float32 and come back in the half dtype, for half tensors and under autocast
    from ebranchformer.nn.dwconv import depthwise_conv_time

    x, w, b = torch.randn(2, 40, channels), torch.randn(channels, 1, 7), torch.randn(channels)
    ref = depthwise_conv_time(x, w, b, 3, 3, fast=False)
    y = depthwise_conv_time(x.to(dtype), w.to(dtype), b.to(dtype), 3, 3, fast=fast)
    with torch.autocast("cpu", dtype=dtype):
        ya = depthwise_conv_time(x, w, b, 3, 3, fast=fast)
    assert y.dtype == ya.dtype == dtype
    torch.testing.assert_close(ya.float(), ref, atol=0.01 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(y.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channels_last_depthwise_conv_trains_under_cpu_autocast(dtype):
    from ebranchformer.nn.dwconv import depthwise_conv_time

    x = torch.randn(2, 40, 8, requires_grad=True)
    w, b = torch.randn(8, 1, 31, requires_grad=True), torch.randn(8, requires_grad=True)
    grads = []
    for fast in (True, False):
        with torch.autocast("cpu", dtype=dtype):
            y = depthwise_conv_time(x, w, b, 15, 15, fast=fast)
        assert y.dtype == dtype
        grads.append(torch.autograd.grad(y.float().pow(2).sum(), (x, w, b)))
    for a, c in zip(*grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, c, atol=0.02 * c.abs().max().item(), rtol=0)  # half-precision products


def _output_and_grads(module, inputs, fn, seed):
    """``fn(module, *inputs)``'s output and the gradients of a fixed random projection of it w.r.t. the module's
    parameters and the float inputs that require grad; ``seed`` fixes the dropout masks."""
    module.zero_grad()
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None
    torch.manual_seed(seed)
    y = fn(module, *inputs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * g).sum().backward()
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    grads += [t.grad.clone() for t in inputs if isinstance(t, torch.Tensor) and t.grad is not None]
    return y.detach(), grads


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["conv2d", "conv2d2", "conv2d6", "conv2d8"]),
    lengths=st.lists(st.integers(15, 90), min_size=1, max_size=4),
    padding=st.sampled_from(["masked", "espnet_legacy"]),
    block_bytes=st.sampled_from([1, 5000, 1 << 30]),  # one frame per block ... one block
    train=st.booleans(),
)
def test_chunked_cpu_frontend_equals_plain(kind, lengths, padding, block_bytes, train):
    # inference (conv_blocks.conv_stack_blocks), and training with the block-wise backward (conv_stack_train):
    # output and every parameter's gradient
    sub = perturb_(Conv2dSubsampling(20, 8, kind=kind)).train(train)
    n, x = torch.tensor(lengths), torch.randn(len(lengths), max(lengths), 20)
    results = []
    with torch.set_grad_enabled(train), mock.patch.multiple(
        subsampling, _BLOCK_BYTES=block_bytes, _TRAIN_BLOCK_BYTES=block_bytes
    ):
        for fast in (True, False):
            sub.fast = fast
            if train:
                results.append(_output_and_grads(sub, (x, n), lambda m, x, n: m(x, n, padding=padding)[0], 0))
            else:
                results.append((sub(x, n, padding=padding)[0], []))
    (y_fast, g_fast), (y_plain, g_plain) = results
    torch.testing.assert_close(y_fast, y_plain, atol=1e-5, rtol=0)
    assert len(g_fast) == len(g_plain) == (2 * len(sub.convs) + 2 if train else 0)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)  # sums over up to 4 x 90 x 20 products


_sizes = st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 3)))


@settings(max_examples=60, deadline=None)
@given(
    convs=st.lists(st.tuples(st.integers(1, 3), _sizes, _sizes), min_size=1, max_size=3),
    pools=st.lists(_sizes, max_size=3),
    conv_padding=st.sampled_from(["same", "valid"]),
    activation=st.sampled_from(["relu", "swish"]),
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    padding=st.sampled_from(["masked", "espnet_legacy"]),
    grad=st.booleans(),
    chunked=st.booleans(),
)
def test_conv_subsample_fast_equals_plain(convs, pools, conv_padding, activation, lengths, padding, grad, chunked):
    # RETURNN's frontend: channels-last, pads inside the conv, in-place ReLU, whole-window pools (strided maxima
    # without gradients), no -inf fill for one-frame pool windows; without gradients on the CPU (chunked) tail-only
    # masks, in place. Loud padding (1e3) makes a missed mask visible; the caller's input stays as it was.
    try:
        sub = ConformerConvSubsample(
            13, out_dims=[c for c, _, _ in convs], filter_sizes=[k for _, k, _ in convs],
            strides=[s for _, _, s in convs], pool_sizes=pools[: len(convs)], activation=activation,
            padding=conv_padding,
        ).double()  # fmt: skip
    except ValueError as e:  # the frequency axis vanishes for this draw
        assert "too small" in str(e)
        assume(False)
    perturb_(sub)
    n = torch.tensor(lengths) + sub.min_length
    t = int(n.max()) + 2
    valid = torch.arange(t)[None, :] < n[:, None]
    x = torch.where(valid[:, :, None], torch.randn(len(lengths), t, 13, dtype=torch.float64), 1e3)
    x0 = x.clone()
    sub.chunked = chunked
    outs = []
    for fast in (True, False):
        sub.fast = fast
        if grad:
            outs.append(_output_and_grads(sub, (x, n), lambda m, x, n: m(x, n, padding=padding)[0], 0))
        else:
            with torch.no_grad():
                y, m = sub(x, n, padding=padding)
            outs.append((y, [m]))
    (y_fast, g_fast), (y_plain, g_plain) = outs
    assert torch.equal(x, x0)
    torch.testing.assert_close(y_fast, y_plain, atol=1e-12, rtol=0)
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_conv6_frontend_fast_equals_plain_in_float32(grad):
    # RETURNN's standard "conv6" (oneDNN's float32 kernels in both layouts), the in-place inference path included
    sub = perturb_(ConformerConvSubsample(
        80, out_dims=[32, 64, 64], filter_sizes=[(3, 3)] * 3, pool_sizes=[(1, 2)], strides=[(1, 1), (3, 1), (2, 1)]
    ))  # fmt: skip
    n = torch.tensor([300, 271, 17])
    x = torch.randn(3, 300, 80)
    outs = []
    for fast in (True, False):
        sub.fast = fast
        with torch.set_grad_enabled(grad):
            outs.append(_output_and_grads(sub, (x, n), lambda m, x, n: m(x, n)[0], 0) if grad else (sub(x, n)[0], []))
    (y_fast, g_fast), (y_plain, g_plain) = outs
    torch.testing.assert_close(y_fast, y_plain, atol=1e-5, rtol=0)
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_conv_subsample_fast_path_has_no_graph_breaks():
    # the tail-only masks read the lengths in Python: dynamo traces the whole-image masks instead
    import torch._dynamo

    sub = ConformerConvSubsample(20, out_dims=[4, 4], filter_sizes=[3, 3], pool_sizes=[(1, 2)], strides=[1, (2, 1)])
    with torch.no_grad():
        explained = torch._dynamo.explain(sub)(torch.randn(2, 30, 20), torch.tensor([30, 21]))
    assert explained.graph_break_count == 0, explained.break_reasons


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), k=st.sampled_from([3, 5]), s=st.integers(1, 3), c=st.integers(1, 9),
    extra_t=st.integers(0, 25), extra_f=st.integers(0, 15), onednn=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)  # fmt: skip
def test_one_channel_conv_as_product_over_taps_equals_conv2d(b, k, s, c, extra_t, extra_f, onednn, dtype):
    # the chunked frontend's first conv (one input channel) as one product over the k x k taps (float32: on oneDNN
    # with bias and ReLU inside, or F.linear)
    from ebranchformer.nn import conv_blocks, linear

    x = torch.randn(b, 1, k + extra_t, k + extra_f, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w, bias = torch.randn(c, 1, k, k, dtype=dtype), torch.randn(c, dtype=dtype)
    with torch.no_grad(), mock.patch.object(linear, "_onednn_built", return_value=onednn and linear._onednn_built()):
        y = conv_blocks._conv_relu(x, w, bias, s)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, F.relu(F.conv2d(x, w, bias, s)), atol=tol, rtol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_chunked_cpu_frontend_does_no_conv_work_on_padded_tails():
    # masked inference: once a row's last conv sees only padding, its blocks are not computed (their frames are
    # the last conv's act(bias), projected), and the output still equals the plain path's on every frame
    sub = perturb_(Conv2dSubsampling(20, 8)).eval()
    x, n = torch.randn(3, 200, 20), torch.tensor([200, 60, 31])
    rows_seen = []
    real_conv2d = F.conv2d

    def conv2d(h, *args, **kwargs):
        rows_seen.append(h.shape[0])
        return real_conv2d(h, *args, **kwargs)

    with torch.no_grad(), mock.patch.object(subsampling, "_BLOCK_BYTES", 1):  # one output frame per block
        sub.fast = False
        plain = sub(x, n)[0]
        sub.fast = True
        with mock.patch.object(F, "conv2d", conv2d):
            fast = sub(x, n)[0]
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    t_out = fast.shape[1]  # 49 frames; the two short rows have 14 and 6
    first_conv_frames = (n - 3) // 2 + 1  # the second conv's valid input frames; output frame t reads 2t ... 2t + 2
    live_rows = [int((first_conv_frames > 2 * t).sum()) for t in range(t_out)]
    # the first conv (one input channel) is a product over its taps, not a conv2d call: the calls seen are the
    # second conv's, and each block's ran on the live rows only
    assert rows_seen == live_rows
    assert sum(rows_seen) < 3 * t_out


def test_chunked_cpu_frontend_under_bf16_autocast():
    sub = perturb_(Conv2dSubsampling(80, 64)).eval()
    x, n = torch.randn(3, 300, 80), torch.tensor([300, 211, 40])
    with torch.no_grad(), mock.patch.object(subsampling, "_HALF_BLOCK_BYTES", 20000):  # several blocks
        sub.fast = False
        ref = sub(x, n)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = sub(x, n)[0]
            sub.fast = True
            fast = sub(x, n)[0]
    assert fast.dtype == plain.dtype == torch.bfloat16
    # both bf16 paths stay within bf16 rounding of the fp32 result (relative to its scale)
    scale = ref.abs().max()
    assert (fast.float() - ref).abs().max() <= 0.02 * scale
    assert (plain.float() - ref).abs().max() <= 0.02 * scale


def test_cpu_frontend_training_under_bf16_autocast():
    # the block-wise backward under autocast: bf16 output, float32 parameter gradients near the float32 ones, and
    # within 1% of the plain path's under autocast
    sub = perturb_(Conv2dSubsampling(80, 64)).train()
    x, n = torch.randn(3, 300, 80), torch.tensor([300, 211, 40])
    results = []
    with mock.patch.object(subsampling, "_TRAIN_BLOCK_BYTES", 100_000):
        for fast, low in ((False, False), (True, True), (False, True)):
            sub.fast = fast
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
                results.append(_output_and_grads(sub, (x, n), lambda m, x, n: m(x, n)[0], 0))
    (y_ref, g_ref), (y_fast, g_fast), (y_plain, g_plain) = results
    assert y_fast.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in g_fast)
    assert (y_fast.float() - y_ref).abs().max() <= 0.02 * y_ref.abs().max()
    for a, b, c in zip(g_fast, g_ref, g_plain):
        assert (a - b).abs().max() <= 0.1 * b.abs().max()  # bf16 sums over ~10^5 products (5% seen in both paths)
        assert (a - c).abs().max() <= 0.01 * c.abs().max()


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    heads=st.sampled_from([1, 2, 4]),
    block_bytes=st.sampled_from([1, 3000, 1 << 30]),  # blocks of 16 rows ... one block
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_blocked_cpu_attention_equals_plain(lengths, heads, block_bytes, dtype):
    from ebranchformer.nn import attention

    att = perturb_(RelPosSelfAttention(16, heads)).to(dtype).eval()
    t = max(lengths)
    x, valid = torch.randn(len(lengths), t, 16, dtype=dtype), _valid(lengths, t)
    with torch.no_grad(), mock.patch.object(attention, "_BLOCK_BYTES", block_bytes):
        att.fast, att.chunked = True, True
        blocked = att(x, valid)
        att.chunked = False
        one_pass = att(x, valid)
        att.fast = False
        plain = att(x, valid)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(blocked, plain, atol=tol, rtol=0)
    torch.testing.assert_close(one_pass, plain, atol=tol, rtol=0)


_ONEDNN = onednn_float32(torch.zeros(1))
needs_onednn = pytest.mark.skipif(not _ONEDNN, reason="oneDNN is not built into this torch")
# the oneDNN pairs serve CPUs other than Intel's (there SDPA's blocks were faster): tests of them mock the vendor
_not_intel = mock.patch("ebranchformer.nn.attention.cpu_vendor", return_value="AuthenticAMD")


@needs_onednn
@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4), heads=st.sampled_from([1, 2, 4]))
def test_blocked_cpu_attention_on_onednn_pairs_equals_plain(lengths, heads):
    # attend_pairs, taken from T' >= _PAIRS_MIN_T on (448; 1 here), against the plain path (its blocks and
    # sub-blocks: test_attend_pairs_equals_attend_blocks)
    from ebranchformer.nn import attention

    att = perturb_(RelPosSelfAttention(16, heads)).eval()
    t = max(lengths)
    x, valid = torch.randn(len(lengths), t, 16), _valid(lengths, t)
    spy = mock.patch.object(attention, "attend_pairs", wraps=attention.attend_pairs)
    with torch.no_grad(), mock.patch.object(attention, "_PAIRS_MIN_T", 1), _not_intel, spy as pairs:
        paired = att(x, valid)
        assert pairs.call_count == 1
        att.fast = False
        plain = att(x, valid)
    torch.testing.assert_close(paired, plain, atol=1e-5, rtol=0)


@needs_onednn
def test_onednn_pairs_only_for_float32_from_the_threshold_on():
    from ebranchformer.nn import attention

    att = perturb_(RelPosSelfAttention(16, 2)).eval()
    x, valid = torch.randn(2, 30, 16), _valid([30, 12], 30)
    spy = mock.patch.object(attention, "attend_pairs", wraps=attention.attend_pairs)
    with torch.no_grad(), spy as pairs:
        with mock.patch.object(attention, "_PAIRS_MIN_T", 31), _not_intel:
            att(x, valid)  # T' = 30 < 31: SDPA in blocks
        with mock.patch.object(attention, "_PAIRS_MIN_T", 30):
            with mock.patch.object(attention, "cpu_vendor", return_value="GenuineIntel"):
                att(x, valid)  # an Intel CPU: SDPA in blocks
            with _not_intel:
                att.double()(x.double(), valid)  # float64: SDPA in blocks
                att.float().onednn = False
                att(x, valid)  # switched off (set_fast_path(False) / set_cpu_blocks(False) do this)
                assert pairs.call_count == 0
                att.onednn = True
                att(x, valid)
    assert pairs.call_count == 1


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), heads=st.sampled_from([1, 3]),
    block=st.sampled_from([1, 7, 64]),
)  # fmt: skip
def test_attend_blocks_key_tails_equal_the_key_bias_sum(lengths, heads, block):
    # padded keys as -inf written into the positional bias view in place (key_tails) instead of a summed key mask
    from ebranchformer.nn.attention import _key_bias, _key_tails
    from ebranchformer.nn.blocked_attention import attend_blocks

    t, dk = max(lengths) + 2, 8  # some padding in every row
    qu, k, v, qv = (torch.randn(len(lengths), heads, t, dk, dtype=torch.float64) for _ in range(4))
    p = torch.randn(heads, 2 * t - 1, dk, dtype=torch.float64)
    valid = _valid(lengths, t)
    tails = _key_tails(valid)
    assert tails == lengths
    with torch.no_grad():
        ref = attend_blocks(qu, k, v, qv, p, _key_bias(valid, torch.float64), block)
        out = attend_blocks(qu, k, v, qv, p, _key_bias(valid, torch.float64), block, key_tails=tails)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    holes = _valid([3, 2], 5)
    holes[0, 0] = False  # not a prefix: no tails, the key mask is summed
    assert _key_tails(holes) is None


@needs_onednn
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("pos_rows", [1, 5, 128])
@pytest.mark.parametrize("block_bytes", [1, 700, 1 << 30])
@pytest.mark.parametrize("relpos", [True, False])
def test_attend_pairs_equals_attend_blocks(pos_rows, block_bytes, relpos, holes):
    # the module's strided (B, H, T, dk) views of (B, T, H, dk) tensors, padded rows (whose keys after the last
    # valid one the pairs leave out), masked keys inside rows with ``holes``, sub-blocks of 1 to 128 rows
    from ebranchformer.nn.blocked_attention import attend_blocks, attend_pairs

    b, h, t, dk = 3, 2, 41, 8
    qu, k, v, qv = (torch.randn(b, t, h, dk).transpose(1, 2) for _ in range(4))  # (B, H, T, dk) views
    p = torch.randn(2 * t - 1, h, dk).transpose(0, 1) if relpos else None  # (H, 2T-1, dk) view
    qv = qv if relpos else None
    valid = _valid([41, 20, 3], t)
    if holes:
        valid[:, 1::3] = False
    key_bias = torch.zeros(b, 1, 1, t).masked_fill_(~valid[:, None, None], float("-inf"))
    with torch.no_grad():
        ref = attend_blocks(qu, k, v, qv, p, key_bias, 16)
        out = attend_pairs(qu, k, v, qv, p, key_bias, block_bytes, pos_rows=pos_rows)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_key_rows_give_the_keys_up_to_the_last_valid_one():
    from ebranchformer.nn.blocked_attention import key_rows

    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    key_bias = torch.zeros(4, 1, 1, 5).masked_fill_(~valid[:, None, None], float("-inf"))
    rows = key_rows(key_bias)
    assert [n for _, n in rows] == [5, 3, 3, 5]  # a row without a valid key keeps all (NaN as on the plain path)
    assert rows[0][0] is None and rows[1][0] is None  # nothing masked among the kept keys
    assert torch.equal(rows[2][0], torch.tensor([0.0, float("-inf"), 0.0]))
    assert torch.equal(rows[3][0], key_bias[3, 0, 0])


@needs_onednn
def test_attend_pairs_converts_bf16_keys_and_values_as_float_does():
    # bf16 inference hands k and v to the pairs in bf16, strided: the same values as their float32 copies
    from ebranchformer.nn.blocked_attention import attend_pairs, dense_float, dense_pair_operands

    b, h, t, dk = 2, 3, 29, 8
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, t, 3, h, dk, generator=gen).bfloat16().permute(2, 0, 3, 1, 4)  # (3, B, H, T, dk) views
    qu, qv = (torch.randn(b, h, t, dk, generator=gen) for _ in range(2))
    k, v = qkv[1], qkv[2]
    p = torch.randn(h, 2 * t - 1, dk, generator=gen)
    key_bias = torch.zeros(b, 1, 1, t).masked_fill_(~_valid([29, 11], t)[:, None, None], float("-inf"))
    got_all, want_all = dense_pair_operands(qu, k, v, qv, p), dense_pair_operands(qu, k.float(), v.float(), qv, p)
    assert len(got_all) == len(want_all) == 5
    for got, want in zip(got_all, want_all):
        assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, want)
    with torch.no_grad():
        got = attend_pairs(qu, k, v, qv, p, key_bias, 700)
        want = attend_pairs(qu, k.float(), v.float(), qv, p, key_bias, 700)
    assert torch.equal(got, want)
    strided = torch.randn(4, 5).t()
    for x in (strided, strided.double(), strided.bfloat16()):  # Tensor.to alone keeps a float32 view strided
        y = dense_float(x)
        assert y.is_contiguous() and y.dtype == (torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
        assert torch.equal(y, x.to(y.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 0.125, 0.3])
def test_biased_queries_dense_without_gradients_equal_the_autograd_sum(dtype, scale):
    from ebranchformer.nn.attention import _biased

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 7, 3, 4, 8, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)[0]  # (B, H, T, dk) view
    bias = torch.randn(4, 8, generator=gen, requires_grad=True)
    with torch.no_grad():
        dense = _biased(q, bias, scale)
    summed = _biased(q, bias, scale)  # with gradients: autograd's ops
    want = q + bias[:, None, :] if scale is None else (q + bias[:, None, :]) * scale
    assert dense.is_contiguous() and not dense.requires_grad and summed.requires_grad
    assert dense.dtype == summed.dtype == torch.float32
    assert torch.equal(dense, want.detach()) and torch.equal(summed, want)
    summed.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 2 * 7 * (1.0 if scale is None else scale)))


@pytest.mark.parametrize("amx", [False, True])  # without AMX the float32 blocks; with AMX SDPA's blocks in bf16
@pytest.mark.parametrize("pairs_from", [1, 448])  # the float32 blocks on oneDNN pairs (1) or SDPA (448 > T')
@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 30])
def test_blocked_cpu_attention_under_bf16_autocast(block_bytes, pairs_from, amx):
    # under bf16 autocast the inference blocks run on the bf16 projections (q, k, v and the position table): in
    # float32 without AMX, and on an AMX CPU (mocked either way) as SDPA in bf16 with a bf16 positional bias and
    # key mask; within bf16 rounding of the one-pass path (SDPA in bf16) and of the float32 module
    from ebranchformer.nn import attention

    att = perturb_(RelPosSelfAttention(32, 4)).eval()
    x, valid = torch.randn(3, 61, 32), _valid([61, 40, 7], 61)
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kwargs):
        sdpa_calls.append((q.dtype, k.dtype, v.dtype, attn_mask.dtype))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    with (
        torch.no_grad(),
        mock.patch.object(attention, "_BLOCK_BYTES", block_bytes),
        mock.patch.object(attention, "_PAIRS_MIN_T", pairs_from),
        mock.patch.object(attention, "cpu_amx_bf16", return_value=amx),
        _not_intel,
        mock.patch.object(attention, "attend_pairs", wraps=attention.attend_pairs) as pairs,
    ):
        ref = att(x, valid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with mock.patch.object(F, "scaled_dot_product_attention", sdpa):
                blocked = att(x, valid)
            att.chunked = False
            one_pass = att(x, valid)
    pairs_calls = (1 + (not amx)) if pairs_from == 1 and _ONEDNN else 0  # ref, and blocked without AMX
    assert pairs.call_count == pairs_calls
    if amx:
        assert sdpa_calls and set(sdpa_calls) == {(torch.bfloat16,) * 4}
    elif pairs_from == 1 and _ONEDNN:
        assert not sdpa_calls  # the float32 blocks went to the oneDNN pairs
    else:
        assert sdpa_calls and set(sdpa_calls) == {(torch.float32,) * 4}
    assert blocked.dtype == one_pass.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (blocked.float() - one_pass.float()).abs().max() <= 0.01 * scale
    assert (blocked.float() - ref).abs().max() <= 0.03 * scale


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    heads=st.sampled_from([1, 2, 4]),
    block_bytes=st.sampled_from([1, 3000, 1 << 30]),  # blocks of 16 rows ... one block
    relpos=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
    keep_probs=st.booleans(),
)
def test_blocked_cpu_attention_training_equals_plain(lengths, heads, block_bytes, relpos, dropout, keep_probs):
    # blocked_attention.attend_blocks_train: the same dropout masks (drawn as the plain path's Dropout draws them),
    # outputs, and gradients w.r.t. the input and every parameter; keep_probs keeps the probabilities for backward
    from ebranchformer.nn import attention

    att = RelPosSelfAttention(16, heads, att_dropout=dropout) if relpos else SelfAttention(16, heads)
    att = perturb_(att).double().train()
    att.att_dropout = att.dropout.p = dropout
    att.keep_probs = keep_probs
    t = max(lengths)
    x, valid = torch.randn(len(lengths), t, 16, dtype=torch.float64, requires_grad=True), _valid(lengths, t)
    results = []
    with mock.patch.object(attention, "_TRAIN_BLOCK_BYTES", block_bytes):
        for fast in (True, False):
            att.fast = fast
            results.append(_output_and_grads(att, (x, valid), lambda m, x, v: m(x, v), 3))
        with torch.no_grad():  # train mode without gradients: still with dropout, the same masks
            att.fast = True
            torch.manual_seed(3)
            y_no_grad = att(x, valid)
    (y_fast, g_fast), (y_plain, g_plain) = results
    assert len(g_fast) == len(g_plain) == len(list(att.parameters())) + 1
    torch.testing.assert_close(y_fast, y_plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(y_no_grad, y_plain, atol=1e-12, rtol=0)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_blocked_cpu_attention_training_float32_and_bf16():
    from ebranchformer.nn import attention

    att = perturb_(RelPosSelfAttention(32, 4, att_dropout=0.1)).train()
    x, valid = torch.randn(3, 50, 32, requires_grad=True), _valid([50, 37, 9], 50)
    with mock.patch.object(attention, "_TRAIN_BLOCK_BYTES", 3000):
        att.fast = False
        y_ref, g_ref = _output_and_grads(att, (x, valid), lambda m, x, v: m(x, v), 4)
        att.fast = True
        y, g = _output_and_grads(att, (x, valid), lambda m, x, v: m(x, v), 4)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, g16 = _output_and_grads(att, (x, valid), lambda m, x, v: m(x, v), 4)
    # bf16 autocast: within bf16 rounding (8 bits of mantissa) of the float32 result, relative to its scale
    assert (y16.float() - y_ref).abs().max() <= 0.03 * y_ref.abs().max()
    for a, b in zip(g16, g_ref):
        assert (a.float() - b).abs().max() <= 0.03 * b.abs().max()
