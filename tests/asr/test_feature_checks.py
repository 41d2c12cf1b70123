"""check_features: default lengths, and errors that name the bad argument."""

from __future__ import annotations

import pytest
import torch

from ebranchformer.asr.feature_checks import check_features


def test_none_lengths_mean_full_rows():
    lens = check_features(torch.zeros(3, 9, 4), None)
    assert lens.dtype == torch.int64 and lens.tolist() == [9, 9, 9]


def test_lengths_are_returned_as_int64():
    assert check_features(torch.zeros(2, 9, 4), torch.tensor([9, 3], dtype=torch.int32)).dtype == torch.int64


def test_bad_x_is_reported_even_without_lengths():
    with pytest.raises(ValueError, match=r"x must have shape"):
        check_features(torch.zeros(9, 4), None)


def test_required_dim():
    with pytest.raises(ValueError, match="in_dim=5"):
        check_features(torch.zeros(1, 9, 4), None, dim=5)


def test_zero_length_row():
    with pytest.raises(ValueError, match="lengths"):
        check_features(torch.zeros(2, 9, 4), torch.tensor([9, 0]))
