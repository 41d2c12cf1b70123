"""The oneDNN Linear path equals F.linear: outputs, fused activations and all three gradients."""

from __future__ import annotations

import gc
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.nn import linear as linear_mod
from ebranchformer.nn.cpu_features import cpu_onednn_bf16
from ebranchformer.nn.linear import Linear, linear

from .conftest import small_encoder

pytestmark = pytest.mark.skipif(linear_mod._onednn_dtype(torch.zeros(1), torch.zeros(1), False) is None,
                                reason="this torch has no oneDNN")  # fmt: skip
# bf16 inference on oneDNN's bf16 kernels (where this CPU has them) and as float32 products of bf16-rounded operands
# (what CPUs without them run; forced here on any CPU)
_BF16_KERNELS = [
    pytest.param(True, id="native", marks=pytest.mark.skipif(not cpu_onednn_bf16(), reason="no oneDNN bf16 here")),
    pytest.param(False, id="emulated"),
]


@pytest.fixture(autouse=True)
def _onednn_float32(monkeypatch):
    """These tests check the oneDNN path itself, also on CPUs where :func:`linear` would pick MKL for float32."""
    monkeypatch.setattr(linear_mod, "cpu_onednn_fp32_faster", lambda: True)


def _grads(fn, x, w, b, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    k=st.integers(1, 70),
    m=st.integers(1, 70),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_onednn_linear_equals_f_linear_with_gradients(lead, k, m, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    w = torch.randn(m, k, generator=gen) / k**0.5
    b = torch.randn(m, generator=gen) if bias else None
    g = torch.randn(*lead, m, generator=gen)
    plain = _grads(F.linear, x, w, b, g)
    for onednn_mm in (True, False):  # the gradient products on oneDNN and on torch.mm
        with mock.patch.object(linear_mod, "cpu_onednn_mm_faster", lambda flag=onednn_mm: flag):
            fast = _grads(lambda x, w, b: linear(x, w, b), x, w, b, g)
        for a, r in zip(fast, plain):
            if r is None:
                assert a is None
            else:
                torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 70), m=st.integers(1, 70), layout=st.sampled_from(["dense", "t", "cols"]),
       onednn_mm=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_mm_and_addmm_equal_torch_mm(n, k, m, layout, onednn_mm, seed):
    gen = torch.Generator().manual_seed(seed)
    if layout == "dense":
        a, b = torch.randn(n, k, generator=gen), torch.randn(k, m, generator=gen)
    elif layout == "t":  # transposed views, as the gradients pass them
        a, b = torch.randn(k, n, generator=gen).t(), torch.randn(m, k, generator=gen).t()
    else:  # column slices (neither dense nor transposed: copied first)
        a, b = torch.randn(n, k + 3, generator=gen)[:, 1 : k + 1], torch.randn(k, m + 2, generator=gen)[:, 2:]
    acc = torch.randn(n + 4, m, generator=gen)
    calls = []
    real = linear_mod._OP
    with mock.patch.object(linear_mod, "cpu_onednn_mm_faster", lambda: onednn_mm), \
            mock.patch.object(linear_mod, "_OP", lambda *args: calls.append(1) or real(*args)):  # fmt: skip
        got = linear_mod.mm(a, b)
        out = torch.full((n, m), float("nan"))
        assert linear_mod.mm(a, b, out=out) is out
        acc_got = acc.clone()
        linear_mod.addmm_(acc_got[2 : n + 2], a, b)  # into a row slice, as the conv phases accumulate
    assert len(calls) == (3 if onednn_mm else 0)
    want = a.double() @ b.double()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, got)
    acc_want = acc.double()
    acc_want[2 : n + 2] += want
    torch.testing.assert_close(acc_got.double(), acc_want, atol=1e-4, rtol=1e-5)
    assert linear_mod.mm(a.double(), b.double()).dtype == torch.float64  # other dtypes: torch.mm


@pytest.mark.parametrize("onednn_mm", [True, False])
@pytest.mark.parametrize(("m", "k"), [(40, 12), (12, 40), (16, 16)])  # the narrower operand on either side
def test_mm_tn_and_mm_left_t_equal_the_transposed_products(onednn_mm, m, k):
    gen = torch.Generator().manual_seed(m * k)
    a, b = torch.randn(77, m, generator=gen), torch.randn(77, k, generator=gen)
    with mock.patch.object(linear_mod, "cpu_onednn_mm_faster", lambda: onednn_mm):
        got = linear_mod.mm_tn(a, b)
        left = linear_mod.mm_left_t(a)
        via_left = linear_mod.mm(left, b)
    assert got.shape == via_left.shape == (m, k)
    want = a.double().t() @ b.double()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(via_left.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(left, a.t()) and left.is_contiguous() == onednn_mm


@pytest.mark.parametrize(("n", "k", "m"), [(1, 1, 1), (37, 64, 499), (128, 64, 626), (499, 499, 64)])
def test_onednn_xwt_eager_equals_the_custom_op(n, k, m):
    # the per-pair loops' direct call: the custom op's values, without its dispatch or autograd
    gen = torch.Generator().manual_seed(n + k + m)
    x, w = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    got = linear_mod.onednn_xwt_eager(x, w)
    assert torch.equal(got, linear_mod.onednn_linear(x, w, None, "none"))
    torch.testing.assert_close(got.double(), x.double() @ w.double().t(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("act", [F.silu, F.gelu, F.relu, torch.tanh])
def test_fused_activation_equals_activation_after_linear(act):
    x, w, b = torch.randn(2, 37, 48) * 2, torch.randn(96, 48) / 7, torch.randn(96)
    with torch.no_grad():
        fused = linear(x, w, b, act)
        ref = act(F.linear(x, w, b))
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    # with gradients the activation runs after the product (its backward needs the pre-activation)
    xg = x.clone().requires_grad_()
    y = linear(xg, w, b, act)
    y.sum().backward()
    xr = x.clone().requires_grad_()
    act(F.linear(xr, w, b)).sum().backward()
    torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_column_slice_weight_and_frozen_weight():
    w = torch.randn(32, 80)
    x = torch.randn(5, 40)
    torch.testing.assert_close(linear(x, w[:, 40:]), F.linear(x, w[:, 40:]), atol=1e-5, rtol=0)
    xg = x.clone().requires_grad_()
    y = linear(xg, w[:, :40])  # weight without grad: only the input gradient is computed
    y.square().sum().backward()
    xr = x.clone().requires_grad_()
    F.linear(xr, w[:, :40]).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_other_dtypes_and_autocast_training_take_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(linear_mod, "_OP", lambda *a: calls.append(1) or torch.zeros(()))
    lin = Linear(16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(lin.double()(x.double()), F.linear(x.double(), lin.weight, lin.bias))
    lin = Linear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # with gradients: autocast's own F.linear
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    lin.onednn = False
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert not calls


@pytest.mark.parametrize("faster", [True, False])
def test_float32_goes_to_onednn_only_where_it_is_the_faster(monkeypatch, faster):
    real, calls = linear_mod._OP, []
    monkeypatch.setattr(linear_mod, "_OP", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(linear_mod, "cpu_onednn_fp32_faster", lambda: faster)
    x, w, b = torch.randn(4, 7, 16), torch.randn(24, 16), torch.randn(24)
    with torch.no_grad():
        y = linear(x, w, b, F.silu)
    torch.testing.assert_close(y, F.silu(F.linear(x, w, b)), atol=1e-5, rtol=1e-5)
    if faster:
        assert calls == ["swish"]
    else:  # MKL's addmm and the activation after it: the plain path's very values
        assert not calls and torch.equal(y, F.silu(F.linear(x, w, b)))


@pytest.mark.parametrize("native", _BF16_KERNELS)
@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    m=st.integers(1, 70),
    bias=st.booleans(),
    act=st.sampled_from([None, F.silu, F.gelu, F.relu]),
    seed=st.integers(0, 2**16),
)
def test_bf16_autocast_inference_on_onednn(native, n, k, m, bias, act, seed):
    # inference under bf16 autocast: oneDNN in bf16 with the activation on the float32 accumulator; autocast's
    # F.linear rounds the product to bf16 before its activation, so the two agree within a few bf16 roundings
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen) / k**0.5
    b = torch.randn(m, generator=gen) if bias else None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with mock.patch.object(linear_mod, "cpu_onednn_bf16", lambda: native):
            y = linear(x, w, b, act)
        ref = F.linear(x, w, b)
        ref = ref if act is None else act(ref)
    # float32 math on the bf16-rounded inputs (what both compute from): y is its one rounding to bf16
    rounded = [None if t is None else t.bfloat16().float() for t in (x, w, b)]
    pre = F.linear(*rounded)
    exact = pre if act is None else act(pre)
    assert y.dtype == ref.dtype == torch.bfloat16
    # ref's first rounding is of the product (before the activation, whose slope is at most 1.13): relative to
    # the larger of the two
    scale = torch.maximum(exact.abs().max(), pre.abs().max()) + 1e-3
    assert (y.float() - ref.float()).abs().max() <= 4 * 2**-8 * scale
    assert ((y.float() - exact).abs() <= 2**-8 * exact.abs() + 1e-5 * scale).all()  # bf16: unit roundoff 2^-8


@pytest.mark.parametrize("native", _BF16_KERNELS)
def test_bf16_autocast_inference_calls_onednn(monkeypatch, native):
    calls = []
    real = linear_mod._OP
    monkeypatch.setattr(linear_mod, "_OP", lambda *a: calls.append((a[0].dtype, a[1].dtype, a[3])) or real(*a))
    monkeypatch.setattr(linear_mod, "cpu_onednn_bf16", lambda: native)
    lin = Linear(16, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin.act(torch.randn(3, 16), F.silu).dtype == torch.bfloat16
    compute = torch.bfloat16 if native else torch.float32
    assert calls == [(compute, compute, "swish")]


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    lin = Linear(12, 7, bias=False)
    assert isinstance(lin, torch.nn.Linear) and list(lin.state_dict()) == ["weight"]
    assert lin.onednn


def test_encoder_switches_turn_onednn_off_and_on():
    enc = small_encoder()
    flags = lambda: {m.onednn for m in enc.modules() if isinstance(m, Linear)}  # noqa: E731
    assert flags() == {True}
    enc.set_cpu_blocks(False)
    assert flags() == {False}
    enc.set_cpu_blocks(True).set_fast_path(False)
    assert flags() == {False}
    x, n = torch.randn(2, 30, 24), torch.tensor([30, 21])
    with torch.no_grad():
        plain = enc.eval()(x, n)[0]
        fast = enc.set_fast_path(True)(x, n)[0]
    assert flags() == {True}
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_flop_counter_counts_the_onednn_linear():
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(6, 5, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with FlopCounterMode(display=False) as fast:
        linear(x, w).sum().backward()
    with FlopCounterMode(display=False) as plain:
        F.linear(x, w).sum().backward()
    assert fast.get_total_flops() == plain.get_total_flops() == 3 * 2 * 30 * 16 * 8


@pytest.mark.parametrize("native", _BF16_KERNELS)
def test_bf16_inference_keeps_each_parameters_cast_until_it_changes(monkeypatch, native):
    monkeypatch.setattr(linear_mod, "cpu_onednn_bf16", lambda: native)
    lin = Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = lin(x)
        cast = linear_mod._CASTS[lin.weight][1]
        y2 = lin(x)
        assert linear_mod._CASTS[lin.weight][1] is cast and torch.equal(y1, y2)  # cast once, reused
        assert cast.dtype == (torch.bfloat16 if native else torch.float32)  # emulated: the rounded float32 values
        assert torch.equal(cast, lin.weight.bfloat16().to(cast.dtype))
        lin.weight.mul_(2)  # an in-place change (as an optimizer step): a new cast
        torch.testing.assert_close(lin(x).float(), F.linear(x, lin.weight, lin.bias).float(), atol=0.05, rtol=0.02)
        assert linear_mod._CASTS[lin.weight][1] is not cast
        lin.load_state_dict({"weight": torch.zeros(8, 16), "bias": torch.ones(8)})
        assert torch.equal(lin(x).float(), torch.ones(5, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # with gradients: no kept cast
        y = lin(x.requires_grad_())
    y.float().sum().backward()
    assert lin.weight.grad is not None
    kept = len(linear_mod._CASTS)
    del lin, y
    gc.collect()
    assert len(linear_mod._CASTS) <= kept - 2  # the weight's and the bias's entries go with them
