"""SpecAugment: masks stay inside each row's valid region, widths within bounds, determinism, identity,
warp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer.asr.specaug import SpecAugConfig, SpecAugment

PAD = 123.0  # sentinel in padded frames


def _batch(lengths: list[int], n_freq: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that are never 0 on valid frames (so masked entries show), PAD on padded frames."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(lengths), max(lengths), n_freq, generator=g) + 1.0  # (B, T, F), in [1, 2)
    for b, n in enumerate(lengths):
        x[b, n:] = PAD
    return x, torch.tensor(lengths)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, width) of the maximal runs of True."""
    runs, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


lengths_st = st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(
    lengths=lengths_st,
    n_freq=st.integers(1, 30),
    nf=st.integers(0, 3),
    nt=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_masks_only_zero_valid_frames_in_whole_rows_and_columns(lengths, n_freq, nf, nt, seed):
    x, lens = _batch(lengths, n_freq, seed)
    aug = SpecAugment(
        time_warp_window=0,
        num_freq_masks=nf,
        freq_mask_width=(0, 8),
        num_time_masks=nt,
        time_mask_width=(0, 15),
    )
    y, out_lens = aug(x, lens, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out_lens, lens)
    for b, n in enumerate(lengths):
        assert torch.all(y[b, n:] == PAD)  # padded frames untouched
        row, zero = y[b, :n], y[b, :n] == 0.0  # (n, F)
        assert torch.all(zero | (row == x[b, :n]))  # every valid entry is kept or zeroed
        masked_frames, masked_bins = zero.all(dim=1), zero.all(dim=0)  # (n,), (F,)
        # zeros are exactly whole masked frames plus whole masked frequency columns
        assert torch.equal(zero, masked_frames[:, None] | masked_bins[None, :])
        assert int(masked_bins.sum()) <= nf * 7 or bool(masked_frames.all())
        assert int(masked_frames.sum()) <= nt * 14 or bool(masked_bins.all())


@pytest.mark.parametrize("axis", ["time", "freq"])
@settings(max_examples=30, deadline=None)
@given(
    lengths=lengths_st,
    n_freq=st.integers(1, 30),
    lo=st.integers(0, 6),
    extra=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_single_mask_width_within_half_open_range(axis, lengths, n_freq, lo, extra, seed):
    hi = lo + extra
    x, lens = _batch(lengths, n_freq, seed)
    if axis == "time":
        opts = {"num_time_masks": 1, "time_mask_width": (lo, hi), "num_freq_masks": 0}
    else:
        opts = {"num_freq_masks": 1, "freq_mask_width": (lo, hi), "num_time_masks": 0}
    y, _ = SpecAugment(time_warp_window=0, **opts)(x, lens, generator=torch.Generator().manual_seed(seed))
    for b, n in enumerate(lengths):
        zero = y[b, :n] == 0.0  # (n, F)
        masked = zero.all(dim=1) if axis == "time" else zero.all(dim=0)  # (n,) or (F,)
        extent = n if axis == "time" else n_freq
        runs = _runs(masked.tolist())
        assert len(runs) <= 1
        width = runs[0][1] if runs else 0
        assert min(lo, extent) <= width <= min(hi - 1, extent)  # clipped to the row's extent


@settings(max_examples=40, deadline=None)
@given(
    lengths=lengths_st,
    r0=st.sampled_from([0.0, 0.05, 0.1]),
    r1=st.sampled_from([0.15, 0.3, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_time_mask_ratio_uses_each_rows_length(lengths, r0, r1, seed):
    x, lens = _batch(lengths, 4, seed)
    aug = SpecAugment(time_warp_window=0, num_freq_masks=0, num_time_masks=1, time_mask_width_ratio=(r0, r1))
    y, _ = aug(x, lens, generator=torch.Generator().manual_seed(seed))
    for b, n in enumerate(lengths):
        runs = _runs((y[b, :n] == 0.0).all(dim=1).tolist())
        width = runs[0][1] if runs else 0
        lo, hi = int(n * r0), min(n, int(n * r1))
        if hi > lo:
            assert lo <= width < hi
        else:
            assert width == 0  # empty range: no mask for this row


def test_exact_width_when_range_has_one_value():
    x, lens = _batch([50, 30], 20)
    aug = SpecAugment(
        time_warp_window=0, num_freq_masks=1, freq_mask_width=(3, 4), num_time_masks=1, time_mask_width=(5, 6)
    )
    y, _ = aug(x, lens, generator=torch.Generator().manual_seed(0))
    for b, n in enumerate([50, 30]):
        zero = y[b, :n] == 0.0
        assert int(zero.all(dim=1).sum()) == 5
        assert int(zero.all(dim=0).sum()) == 3


def test_identity_when_everything_is_off():
    x, lens = _batch([40, 17], 10)
    aug = SpecAugment(time_warp_window=0, num_freq_masks=0, num_time_masks=0)
    y, _ = aug(x, lens)
    assert torch.equal(y, x)


def test_deterministic_given_a_generator():
    x, lens = _batch([200, 150, 90, 40], 80)
    aug = SpecAugment()
    a, _ = aug(x, lens, generator=torch.Generator().manual_seed(42))
    b, _ = aug(x, lens, generator=torch.Generator().manual_seed(42))
    c, _ = aug(x, lens, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_deterministic_given_the_global_seed():
    x, lens = _batch([200, 150], 80)
    aug = SpecAugment()
    torch.manual_seed(7)
    a, _ = aug(x, lens)
    torch.manual_seed(7)
    b, _ = aug(x, lens)
    assert torch.equal(a, b)


def test_input_is_not_modified():
    x, lens = _batch([120, 60], 80)
    before = x.clone()
    SpecAugment()(x, lens, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, before)


def test_replace_with_mean_of_valid_entries():
    x, lens = _batch([30, 10], 5)
    aug = SpecAugment(
        time_warp_window=0,
        num_freq_masks=0,
        num_time_masks=1,
        time_mask_width=(4, 5),
        replace_with_zero=False,
    )
    y, _ = aug(x, lens, generator=torch.Generator().manual_seed(0))
    mean = torch.cat([x[0, :30], x[1, :10]]).mean()  # the PAD frames do not count
    changed = (y != x).all(dim=2)  # (B, T)
    assert int(changed.sum()) == 8
    torch.testing.assert_close(y[changed], mean.expand(8, 5))


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, window=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_nearest_time_warp_is_a_monotone_resampling_within_the_row(lengths, window, seed):
    ramp = torch.arange(max(lengths), dtype=torch.float32)[None, :, None].repeat(
        len(lengths), 1, 3
    )  # (B, T, 3)
    for b, n in enumerate(lengths):
        ramp[b, n:] = PAD
    aug = SpecAugment(time_warp_window=window, time_warp_mode="nearest", num_freq_masks=0, num_time_masks=0)
    y, _ = aug(ramp, torch.tensor(lengths), generator=torch.Generator().manual_seed(seed))
    for b, n in enumerate(lengths):
        assert torch.all(y[b, n:] == PAD)  # padding untouched
        src = y[b, :n, 0]
        assert torch.all((src >= 0) & (src < n) & (src == src.round()))  # values come from this row only
        assert torch.all(src[1:] >= src[:-1])  # order of frames kept
        if n <= 2 * window:
            assert torch.equal(y[b, :n], ramp[b, :n])  # too short to warp


def test_bicubic_time_warp_keeps_constant_rows_constant():
    x = torch.full((3, 100, 8), 2.5)
    lens = torch.tensor([100, 64, 11])
    x[1, 64:] = PAD
    x[2, 11:] = PAD
    y, _ = SpecAugment(time_warp_window=5, num_freq_masks=0, num_time_masks=0)(
        x, lens, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y[1, :64], x[1, :64])
    assert torch.all(y[1, 64:] == PAD) and torch.equal(y[2], x[2])


def test_time_warp_actually_warps():
    x, lens = _batch([100], 4)
    y, _ = SpecAugment(time_warp_window=5, num_freq_masks=0, num_time_masks=0)(
        x, lens, generator=torch.Generator().manual_seed(3)
    )
    assert not torch.equal(y, x) and y.shape == x.shape


def test_config_round_trip_and_defaults():
    cfg = SpecAugConfig()
    assert (cfg.time_warp_window, cfg.num_freq_masks, cfg.freq_mask_width) == (5, 2, (0, 27))
    assert cfg.time_mask_width is None and cfg.time_mask_width_ratio == (0.0, 0.05)
    for c in (cfg, SpecAugConfig(time_mask_width=40, freq_mask_width=30)):
        assert SpecAugConfig.from_dict(c.to_dict()) == c
        assert SpecAugConfig.from_yaml(c.to_yaml()) == c
    assert SpecAugConfig(time_mask_width=40).time_mask_width == (0, 40)  # ESPnet: an int n means (0, n)
    assert SpecAugment(SpecAugConfig(num_time_masks=3)).config == SpecAugment(num_time_masks=3).config


# --- bad input: one test each ---


def test_both_time_width_options():
    with pytest.raises(ValueError, match="time_mask_width"):
        SpecAugConfig(time_mask_width=(0, 40), time_mask_width_ratio=(0.0, 0.05))


def test_empty_width_range():
    with pytest.raises(ValueError, match="freq_mask_width"):
        SpecAugConfig(freq_mask_width=(5, 5))


def test_non_pair_width():
    with pytest.raises(TypeError, match="freq_mask_width"):
        SpecAugConfig(freq_mask_width=(0, 5, 9))


def test_ratio_above_one():
    with pytest.raises(ValueError, match="time_mask_width_ratio"):
        SpecAugConfig(time_mask_width_ratio=(0.0, 1.5))


def test_negative_mask_count():
    with pytest.raises(ValueError, match="num_freq_masks"):
        SpecAugConfig(num_freq_masks=-1)


def test_unknown_warp_mode():
    with pytest.raises(ValueError, match="time_warp_mode"):
        SpecAugConfig(time_warp_mode="linear")


def test_config_and_options_together():
    with pytest.raises(TypeError, match="config"):
        SpecAugment(SpecAugConfig(), num_freq_masks=1)


def test_two_dimensional_features():
    with pytest.raises(ValueError, match="shape"):
        SpecAugment()(torch.zeros(10, 80))


def test_integer_features():
    with pytest.raises(TypeError, match="floating"):
        SpecAugment()(torch.zeros(1, 10, 80, dtype=torch.int32))


def test_lengths_beyond_time():
    with pytest.raises(ValueError, match="lengths"):
        SpecAugment()(torch.zeros(2, 10, 80), torch.tensor([10, 11]))


def test_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        SpecAugment()(torch.zeros(1, 10, 80), generator=0)
