"""Training attention per (batch row, head) pair on oneDNN (``nn.pair_attention``) against the blocked path and the
plain modules: outputs and all gradients."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer import RelPosSelfAttention, SelfAttention
from ebranchformer.nn import attention, pair_attention
from ebranchformer.nn import linear as linear_mod
from ebranchformer.nn.blocked_attention import attend_blocks_train
from ebranchformer.nn.pair_attention import attend_pairs_train

from .conftest import perturb_
from .test_fast_paths import _output_and_grads, _valid

_ONEDNN = linear_mod.onednn_float32(torch.zeros(1))


def _inputs(lengths, heads, dk, relpos, drop, dtype, seed, holes=False):
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    qu, k, v = rand(b, heads, t, dk), rand(b, heads, t, dk), rand(b, heads, t, dk)
    qv, p = (rand(b, heads, t, dk), rand(heads, 2 * t - 1, dk)) if relpos else (None, None)
    valid = _valid(lengths, t)
    if holes:  # masked keys inside the rows too (a valid mask need not be a prefix); key 0 stays valid
        valid &= (torch.rand(b, t, generator=g) >= 0.3) | (torch.arange(t) == 0)
    key_bias = torch.zeros(b, 1, 1, t, dtype=dtype).masked_fill_(~valid[:, None, None], float("-inf"))
    keep = torch.rand(b, heads, t, t, generator=g) >= drop if drop else None
    go = torch.randn(b, t, heads * dk, generator=g, dtype=dtype)
    return (qu, k, v, qv, p), key_bias, keep, go


def _run(fn, tensors, key_bias, keep, drop, go, **kw):
    y = fn(*tensors, key_bias, keep, drop, **kw)
    wrt = [x for x in tensors if x is not None]
    return [y, *torch.autograd.grad(y, wrt, go)]


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    heads=st.sampled_from([1, 2, 3]),
    dk=st.sampled_from([1, 4, 8]),
    relpos=st.booleans(),
    drop=st.sampled_from([0.0, 0.25]),
    store=st.booleans(),
    pos_rows=st.sampled_from([1, 7, 256]),
    onednn=st.booleans(),
    holes=st.booleans(),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_attend_pairs_train_equals_attend_blocks_train(
    lengths, heads, dk, relpos, drop, store, pos_rows, onednn, holes, seed
):
    # float64 on torch.mm, or float32 with every product on oneDNN (forced on any CPU that has it)
    if onednn and not _ONEDNN:
        return
    dtype, tol = (torch.float32, 1e-5) if onednn else (torch.float64, 1e-12)
    # each pair's products leave out the keys after its row's last valid one (key_rows); those get zero gradients
    tensors, key_bias, keep, go = _inputs(lengths, heads, dk, relpos, drop, dtype, seed, holes)
    calls = []
    real = linear_mod._OP
    with mock.patch.object(linear_mod, "cpu_onednn_mm_faster", lambda: onednn), \
            mock.patch.object(linear_mod, "_OP", lambda *a: calls.append(1) or real(*a)):  # fmt: skip
        got = _run(attend_pairs_train, tensors, key_bias, keep, drop, go, store=store, pos_rows=pos_rows)
    assert bool(calls) == onednn
    want = _run(attend_blocks_train, tensors, key_bias, keep, drop, go, block=5, store=False)
    assert len(got) == len(want) == (6 if relpos else 4)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)


@pytest.mark.skipif(not _ONEDNN, reason="this torch has no oneDNN")
@pytest.mark.parametrize("relpos", [True, False])
@pytest.mark.parametrize(("faster", "zen4", "min_t", "pairs"), [
    (True, False, 45, True), (True, False, 46, False), (False, False, 0, False), (True, True, 45, True),
    (True, True, 46, False), (False, True, 0, False),
])  # fmt: skip
def test_attention_training_takes_the_pairs_where_onednn_beats_mkl(monkeypatch, relpos, faster, zen4, min_t, pairs):
    # float32 CPU training: on the pairs where cpu_onednn_mm_faster says so and T' >= _PAIRS_MIN_T (on AMD Zen 4,
    # cpu_avx512_double_pumped, T' >= _TRAIN_PAIRS_MIN_T_ZEN4), else the blocks; the same output and gradients
    # (input and every parameter) as the plain path, same dropout masks
    att = RelPosSelfAttention(32, 4, att_dropout=0.2) if relpos else SelfAttention(32, 4, att_dropout=0.2)
    att = perturb_(att).train()
    x, valid = torch.randn(3, 45, 32, requires_grad=True), _valid([45, 30, 8], 45)
    monkeypatch.setattr(attention, "cpu_onednn_mm_faster", lambda: faster)
    monkeypatch.setattr(linear_mod, "cpu_onednn_mm_faster", lambda: faster)
    monkeypatch.setattr(attention, "cpu_avx512_double_pumped", lambda: zen4)
    # the threshold that does not apply is set so that it would give the other answer
    other = 10**6 if pairs else 0
    monkeypatch.setattr(attention, "_PAIRS_MIN_T", other if zen4 else min_t)
    monkeypatch.setattr(attention, "_TRAIN_PAIRS_MIN_T_ZEN4", min_t if zen4 else other)
    seen = []
    real = pair_attention.attend_pairs_train
    monkeypatch.setattr(attention, "attend_pairs_train", lambda *a, **k: seen.append(1) or real(*a, **k))
    y, g = _output_and_grads(att, (x, valid), lambda m, x, v: m(x, v), 5)
    assert bool(seen) == pairs
    att.fast = False
    y_ref, g_ref = _output_and_grads(att, (x, valid), lambda m, x, v: m(x, v), 5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    assert len(g) == len(g_ref) == len(list(att.parameters())) + 1
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
