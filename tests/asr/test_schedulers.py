"""Learning-rate schedules: ESPnet's WarmupLR ("noam"), warm-up + cosine, constant; LambdaLR integration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.schedulers import LRSchedule, build_scheduler


@given(warmup=st.integers(1, 5000), k=st.integers(0, 100_000))
def test_noam_is_espnet_warmuplr(warmup, k):
    n = k + 1
    expected = warmup**0.5 * min(n**-0.5, n * warmup**-1.5)  # espnet2.schedulers.warmup_lr.WarmupLR
    assert LRSchedule("noam", warmup)(k) == pytest.approx(expected, rel=1e-12)
    assert LRSchedule("noam", warmup)(warmup - 1) == pytest.approx(1.0)  # the peak: the configured lr


@given(warmup=st.integers(0, 200), extra=st.integers(1, 1000), floor=st.floats(0.0, 1.0))
def test_warmup_cosine_shape(warmup, extra, floor):
    total = warmup + extra
    s = LRSchedule("warmup_cosine", warmup, total, floor)
    values = [s(k) for k in range(total + 5)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values[:warmup]))  # rising warm-up
    assert values[max(warmup - 1, 0)] == pytest.approx(1.0 if warmup else s(0))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values[warmup:]))  # then falling
    assert values[total - 1] == pytest.approx(floor) and values[-1] == pytest.approx(floor)
    assert all(floor - 1e-12 <= v <= 1.0 + 1e-12 for v in values[warmup:])


def test_constant_after_warmup():
    s = LRSchedule("constant", 4)
    assert [s(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LRSchedule("constant", 0)(0) == 1.0


def test_lambda_lr_drives_the_optimizer_and_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.01)
    sched = build_scheduler(opt, LRSchedule("noam", 3))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01 * LRSchedule("noam", 3)(k) for k in range(5)])
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched2 = build_scheduler(opt2, LRSchedule("noam", 99))
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0].warmup_steps == 3 and sched2.last_epoch == 5
    assert sched2.get_last_lr() == pytest.approx([0.01 * LRSchedule("noam", 3)(5)])
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * LRSchedule("noam", 3)(6))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("linear", 10), "scheduler"),
        (("noam", 0), "warmup_steps"),
        (("warmup_cosine", 10, None), "total_steps"),
        (("warmup_cosine", 10, 10), "total_steps"),
        (("constant", 1, None, 1.5), "min_lr_ratio"),
    ],
)
def test_bad_schedules(args, words):
    with pytest.raises(ValueError, match=words):
        LRSchedule(*args)


@settings(max_examples=30)
@given(k=st.integers(0, 10**6))
def test_schedules_are_finite_and_positive(k):
    for s in (LRSchedule("noam", 25), LRSchedule("warmup_cosine", 25, 500, 0.1), LRSchedule("constant", 25)):
        assert math.isfinite(s(k)) and s(k) > 0
