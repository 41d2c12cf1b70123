"""CPU inference on groups of batch rows in threads (``nn.cpu_threads``, ``ConformerEncoder.split_rows``): the
same values as one pass, the worker threads' own intra-op thread counts and thread-local modes."""

from __future__ import annotations

import threading
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebranchformer import Conv2dSubsampling, build_dict
from ebranchformer.nn import cpu_threads
from ebranchformer.nn import encoder as encoder_module

from ..asr.ctc_corpus import torch_threads
from .conftest import perturb_, small_encoder

pytestmark = pytest.mark.skipif(not cpu_threads.available(), reason="torch here has no OpenMP backend")


@pytest.mark.parametrize(
    ("threads", "batch", "plan"),
    [(2, 8, [1, 1]), (2, 2, [1, 1]), (2, 1, []), (1, 8, []), (4, 3, [2, 1, 1]), (4, 8, [1, 1, 1, 1]), (5, 2, [3, 2]),
     (16, 8, [4, 4, 4, 4]), (7, 16, [2, 2, 2, 1])],
)
def test_plan_shares_the_threads_out_over_the_groups(threads, batch, plan):
    with torch_threads(threads):
        assert cpu_threads.plan_groups(batch) == plan


def test_workers_run_with_their_own_thread_counts_and_leave_the_callers():
    with torch_threads(4), torch.no_grad():
        got = cpu_threads.run_groups(lambda: torch.get_num_threads(), [(), (), ()], [2, 1, 1])
        assert got == [2, 1, 1]
        assert torch.get_num_threads() == 4
        info = torch.__config__.parallel_info()  # this thread's OpenMP and MKL counts, as torch reports them
        assert "omp_get_max_threads() : 4" in info
        assert "mkl_get_max_threads()" not in info or "mkl_get_max_threads() : 4" in info
        # on a worker thread nothing is split again
        assert cpu_threads.run_groups(lambda: cpu_threads.plan_groups(8), [()], [1]) == [[]]


def test_run_groups_on_a_worker_runs_inline_without_deadlock():
    def inner():  # 3 groups inside each of 2 busy workers: queued on the same pool they would never start
        with torch.no_grad():
            return threading.get_ident(), cpu_threads.run_groups(threading.get_ident, [(), (), ()], [1, 1, 1])

    result = []

    def outer():
        with torch_threads(2), torch.no_grad():
            result.extend(cpu_threads.run_groups(inner, [(), ()], [1, 1]))

    t = threading.Thread(target=outer, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "nested run_groups deadlocked"
    assert len(result) == 2 and all(idents == [ident] * 3 for ident, idents in result)


def test_workers_take_the_callers_modes():
    def modes():
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"))  # fmt: skip

    with torch_threads(2):
        with torch.no_grad():
            assert cpu_threads.run_groups(modes, [()], [1])[0][:3] == (False, False, False)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_threads.run_groups(modes, [()], [1])[0] == (False, True, True, torch.bfloat16)


def test_run_groups_rejects_gradients_and_bad_plans_and_raises_worker_errors():
    with pytest.raises(RuntimeError, match="inference"):
        cpu_threads.run_groups(lambda: None, [()], [1])
    with torch.no_grad():
        with pytest.raises(ValueError, match="one entry per group"):
            cpu_threads.run_groups(lambda: None, [(), ()], [1])

        def boom(i):
            if i == 1:
                raise KeyError("group 1")
            return i

        with pytest.raises(KeyError, match="group 1"):
            cpu_threads.run_groups(boom, [(0,), (1,)], [1, 1])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(12, 70), min_size=2, max_size=5),
    padding=st.sampled_from(["masked", "espnet_legacy"]),
    threads=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
def test_encoder_on_row_groups_equals_one_pass(lengths, padding, threads, seed):
    torch.manual_seed(seed)
    enc = perturb_(small_encoder(build_dict(Conv2dSubsampling, kind="conv2d"), padding=padding), seed=seed).eval()
    n = torch.tensor(lengths)
    x = torch.randn(len(lengths), max(lengths) + 3, 24)
    with torch_threads(threads), torch.no_grad():
        enc.split_rows = False
        y0, n0, c0 = *enc(x, n, collected_outputs=(c0 := {})), c0
        enc.split_rows = True
        y1, n1, c1 = *enc(x, n, collected_outputs=(c1 := {})), c1
    assert torch.equal(n0, n1) and y0.shape == y1.shape
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=0)  # every frame, padding included
    assert sorted(c1) == sorted(c0) == ["0", "1"]
    for key in c0:
        torch.testing.assert_close(c1[key], c0[key], atol=1e-5, rtol=0)


def test_encoder_splits_only_cpu_inference(monkeypatch):
    calls = []
    real = encoder_module.run_groups
    monkeypatch.setattr(encoder_module, "run_groups", lambda *a: calls.append(len(a[1])) or real(*a))
    torch.manual_seed(0)
    enc = small_encoder(build_dict(Conv2dSubsampling, kind="conv2d"), interctc_layers=(1,),
                        interctc_use_conditioning=True, vocab_size=7)  # fmt: skip
    ctc = torch.nn.Linear(32, 7)
    x, n = torch.randn(3, 40, 24), torch.tensor([40, 33, 21])
    with torch_threads(2):
        enc.eval()
        with torch.no_grad():
            y_split = enc(x, n, ctc=ctc)[0]  # interCTC conditioning runs inside the groups
        assert calls == [2]
        y_grad = enc(x, n, ctc=ctc)[0]  # gradients enabled: one pass
        enc.train()
        with torch.no_grad():
            enc(x, n, ctc=ctc)  # train mode (dropout draws): one pass
        enc.eval().set_cpu_blocks(False)
        with torch.no_grad():
            enc(x, n, ctc=ctc)
        assert calls == [2]
    torch.testing.assert_close(y_split, y_grad.detach(), atol=1e-5, rtol=0)


def test_counted_profiled_or_traced_calls_are_not_split():
    """FlopCounterMode, the profiler and jit tracing are thread-local: split, the groups' ops would escape them."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    enc = small_encoder(build_dict(Conv2dSubsampling, kind="conv2d")).eval()
    x, n = torch.randn(4, 60, 24), torch.tensor([60, 50, 40, 30])
    with torch_threads(2), torch.no_grad():
        assert cpu_threads.plan_groups(4) == [1, 1]
        flops = {}
        for split in (False, True):
            enc.split_rows = split
            with FlopCounterMode(display=False) as fc:
                enc(x, n)
            flops[split] = fc.get_total_flops()
            with torch.profiler.profile() as prof:
                enc(x, n)
            assert any("linear" in e.key for e in prof.key_averages())
        assert flops[True] == flops[False] > 0
        with mock.patch.object(torch._C, "_get_tracing_state", lambda: object()):
            assert cpu_threads.plan_groups(4) == []


# Training on row groups (run_train_groups, ConformerEncoder.split_rows_train)


def _train_grads(enc, x, n, split: bool, seed: int = 1, collect: bool = False):
    """Output, collected layer outputs and every parameter's gradient of one training step."""
    enc.split_rows_train = split
    enc.zero_grad()
    torch.manual_seed(seed)
    collected = {} if collect else None
    y, _ = enc(x, n, collected_outputs=collected)
    loss = y.square().sum() + (sum(v.sum() for v in collected.values()) if collect else 0)
    loss.backward()
    return y.detach(), collected, {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}


@pytest.fixture
def intel(monkeypatch):
    """The training split's vendor gate open on any CPU, and the calls of run_train_groups recorded."""
    monkeypatch.setattr(encoder_module, "cpu_vendor", lambda: "GenuineIntel")
    calls = []
    real = encoder_module.run_train_groups
    monkeypatch.setattr(encoder_module, "run_train_groups", lambda *a: calls.append(len(a[1])) or real(*a))
    return calls


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(20, 70), min_size=2, max_size=5),
    padding=st.sampled_from(["masked", "espnet_legacy"]),
    threads=st.sampled_from([2, 3]),
)
def test_training_on_row_groups_equals_one_pass(intel, lengths, padding, threads):
    # no dropout: the same function; float64, so the gradients (summed over the groups) agree to rounding
    intel.clear()
    torch.manual_seed(0)
    enc = perturb_(small_encoder(build_dict(Conv2dSubsampling, kind="conv2d"), padding=padding, dropout=0.0,
                                 att_dropout=0.0, input_dropout=0.0)).double().train()  # fmt: skip
    n = torch.tensor(lengths)
    x = torch.randn(len(lengths), max(lengths) + 2, 24, dtype=torch.float64)
    with torch_threads(threads):
        y1, c1, g1 = _train_grads(enc, x, n, split=True, collect=True)
        assert intel == [min(len(lengths), threads)]
        y0, c0, g0 = _train_grads(enc, x, n, split=False, collect=True)
    assert intel == [min(len(lengths), threads)]
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=0)
    assert sorted(c1) == sorted(c0) == ["0", "1"]
    for key in c0:
        torch.testing.assert_close(c1[key], c0[key], atol=1e-12, rtol=0)
    assert sorted(g1) == sorted(g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-10, rtol=1e-10)


def test_training_on_row_groups_draws_reproducible_masks_of_its_own_per_group(intel):
    torch.manual_seed(0)
    enc = perturb_(small_encoder(build_dict(Conv2dSubsampling, kind="conv2d"))).train()
    x = torch.randn(1, 50, 24).expand(2, -1, -1).contiguous()  # two equal rows, one group each
    n = torch.tensor([50, 50])
    with torch_threads(2):
        (ya, _, ga), (yb, _, gb) = _train_grads(enc, x, n, True), _train_grads(enc, x, n, True)
        yc, _, _ = _train_grads(enc, x, n, True, seed=2)
    assert intel == [2, 2, 2]
    assert torch.equal(ya, yb) and all(torch.equal(ga[k], gb[k]) for k in ga)  # torch.manual_seed fixes them
    assert not torch.equal(ya, yc)
    assert not torch.allclose(ya[0], ya[1])  # the groups' masks are not the same draws


class _Elsewhere(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_training_is_split_only_where_rows_stay_independent(intel, monkeypatch):
    from ebranchformer import ConformerLayer

    torch.manual_seed(0)
    x, n = torch.randn(2, 40, 24), torch.tensor([40, 31])

    def step(enc, x=x):
        enc.train().zero_grad()
        enc(x, n)[0].sum().backward()

    with torch_threads(2):
        step(small_encoder(build_dict(Conv2dSubsampling, kind="conv2d")))
        assert intel == [2]
        step(small_encoder(build_dict(Conv2dSubsampling), encoder_layer=build_dict(ConformerLayer, ff_dim=48)))
        step(small_encoder(build_dict(Conv2dSubsampling), layer_drop=0.5))
        step(small_encoder(build_dict(Conv2dSubsampling), dropout_broadcast=True))
        enc = small_encoder(build_dict(Conv2dSubsampling))
        enc.gradient_checkpointing = True
        step(enc)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            step(small_encoder(build_dict(Conv2dSubsampling)))
        step(small_encoder(build_dict(Conv2dSubsampling)), x.clone().requires_grad_())
        enc = small_encoder(build_dict(Conv2dSubsampling))
        enc.layers[0].ffn1.add_module("extra", _Elsewhere())  # a module from outside torch.nn and the package
        step(enc)
        enc = small_encoder(build_dict(Conv2dSubsampling))
        enc.split_rows_train = False
        step(enc)
        monkeypatch.setattr(encoder_module, "cpu_vendor", lambda: "AuthenticAMD")
        step(small_encoder(build_dict(Conv2dSubsampling)))
    assert intel == [2]


def test_run_train_groups_gives_summed_parameter_gradients_once():
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(2, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)]
    with torch_threads(2):
        parts = cpu_threads.run_train_groups(lambda a: (a @ w, torch.tensor(len(a))), [(a,) for a in xs], [1, 1], [w])
        assert [p[1].item() for p in parts] == [2, 5] and not parts[0][1].requires_grad
        loss = sum((p[0] ** 2).sum() for p in parts)
        (gw,) = torch.autograd.grad(loss, [w], retain_graph=True)
        torch.testing.assert_close(gw, sum(2 * a.t() @ (a @ w) for a in xs).detach(), atol=1e-12, rtol=0)
        with pytest.raises(RuntimeError, match="supports one backward"):
            loss.backward()  # the groups' graphs went with the first backward
        with pytest.raises(RuntimeError, match="gradients must be enabled"), torch.no_grad():
            cpu_threads.run_train_groups(lambda a: a @ w, [(xs[0],)], [1], [w])
        with pytest.raises(ValueError, match="one entry per group"):
            cpu_threads.run_train_groups(lambda a: a @ w, [(xs[0],), (xs[1],)], [1], [w])
        with pytest.raises(TypeError, match="must return tensors"):
            cpu_threads.run_train_groups(lambda a: (a @ w, 3), [(xs[0],)], [1], [w])
