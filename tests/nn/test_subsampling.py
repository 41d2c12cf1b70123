"""ESPnet-style frontends: output lengths per row (masked) and by mask slicing (legacy), frame stacking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebranchformer import Conv2dSubsampling, FrameStacking

from .conftest import perturb_


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["conv2d", "conv2d2", "conv2d6", "conv2d8"]),
    lengths=st.lists(st.integers(15, 80), min_size=1, max_size=4),
)
def test_conv2d_lengths_equal_the_actual_conv_output(kind, lengths):
    sub = Conv2dSubsampling(20, 8, kind=kind).eval()
    n = torch.tensor(lengths)
    with torch.no_grad():
        y, yl = sub(torch.randn(len(lengths), max(lengths), 20), n)
        for b, length in enumerate(lengths):  # alone, a row's output has exactly its conv-formula length
            y1, yl1 = sub(torch.randn(1, length, 20), n[b : b + 1])
            assert y1.shape[1] == int(yl1) == int(yl[b])
    assert y.shape[1] == int(yl.max())


def test_min_length_is_the_shortest_input_with_one_output_frame():
    for kind, expected in (("conv2d", 7), ("conv2d2", 7), ("conv2d6", 11), ("conv2d8", 15)):
        sub = Conv2dSubsampling(20, 8, kind=kind)
        assert sub.min_length == expected  # ESPnet's check_short_utt thresholds
        assert int(sub.output_lengths(torch.tensor([expected]))) == 1
        assert int(sub.output_lengths(torch.tensor([expected - 1]))) == 0


SLICES = {"conv2d": [(2, 2), (2, 2)], "conv2d2": [(2, 2), (2, 1)], "conv2d6": [(2, 2), (4, 3)],
          "conv2d8": [(2, 2), (2, 2), (2, 2)]}  # ESPnet's mask[:, :-trim:step] per conv  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(sorted(SLICES)), t=st.integers(15, 120), data=st.data())
def test_legacy_lengths_follow_espnet_mask_slicing(kind, t, data):
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, t), min_size=1, max_size=5)) + [t])
    mask = torch.arange(t)[None] < lengths[:, None]
    for trim, step in SLICES[kind]:
        mask = mask[:, :-trim:step]
    sub = Conv2dSubsampling(20, 8, kind=kind)
    assert sub.legacy_lengths(lengths, t).tolist() == mask.sum(1).tolist()
    assert int(sub.output_lengths(lengths[-1:])) == mask.shape[1]  # the longest row gets the conv formula


@settings(max_examples=30, deadline=None)
@given(factor=st.integers(1, 6), lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), extra=st.integers(0, 7))
def test_frame_stacking_is_batch_invariant_and_equals_reshape(factor, lengths, extra):
    fs = perturb_(FrameStacking(5, 7, factor=factor)).double()
    n = torch.tensor(lengths)
    t = max(lengths) + extra
    x = torch.randn(len(lengths), t, 5, dtype=torch.float64) + 100 * (
        torch.arange(t)[None, :, None] >= n[:, None, None]
    )
    y, yl = fs(x, n)
    for b, length in enumerate(lengths):
        stacked = torch.cat([x[b, :length], x.new_zeros((-length) % factor, 5)]).reshape(-1, factor * 5)
        assert int(yl[b]) == stacked.shape[0]
        torch.testing.assert_close(y[b, : int(yl[b])], fs.linear(stacked), atol=1e-12, rtol=0)


def test_frame_stacking_rejects_bad_factor():
    with pytest.raises(ValueError, match="factor must be a positive int"):
        FrameStacking(5, 7, factor=0)
