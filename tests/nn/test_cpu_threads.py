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
