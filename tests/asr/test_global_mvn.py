"""GlobalMVN: parity with ESPnet's GlobalMVN on an ESPnet-layout stats file, stats round trips, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebranchformer.asr.global_mvn import GlobalMVN, compute_stats


def _utterances(seed: int, dim: int = 80) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scale, offset = rng.uniform(0.5, 4.0, dim), rng.uniform(-12.0, 2.0, dim)
    return [(rng.standard_normal((n, dim)) * scale + offset).astype(np.float32) for n in (57, 130, 12, 301)]


def _write_espnet_style_stats(path, utts: list[np.ndarray]) -> None:
    """What ESPnet's collect_stats writes: float32 per-utterance sums accumulated, an int frame count."""
    total, total_sq, count = 0, 0, 0
    for seq in utts:
        total += seq.sum(0)
        total_sq += (seq**2).sum(0)
        count += len(seq)
    np.savez(path, count=count, sum=total, sum_square=total_sq)


def _batch(seed: int, lengths: list[int], dim: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g) * 3 - 5  # (B, T, F)
    return x, torch.tensor(lengths)


@pytest.mark.parity
@pytest.mark.parametrize("norm_means,norm_vars", [(True, True), (True, False), (False, True)])
def test_espnet_stats_file_gives_espnet_output(tmp_path, norm_means, norm_vars):
    from espnet2.layers.global_mvn import GlobalMVN as EspnetGlobalMVN

    path = tmp_path / "feats_stats.npz"
    _write_espnet_style_stats(path, _utterances(0))
    ref_mod = EspnetGlobalMVN(path, norm_means=norm_means, norm_vars=norm_vars)
    ours_mod = GlobalMVN.from_espnet_stats(path, norm_means=norm_means, norm_vars=norm_vars)
    x, lens = _batch(1, [40, 25, 7])
    ref, ref_lens = ref_mod(x.clone(), lens)
    ours, ours_lens = ours_mod(x, lens)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert torch.equal(ours_lens, ref_lens)
    assert torch.all(ours[1, 25:] == 0.0) and torch.all(ours[2, 7:] == 0.0)


@pytest.mark.parity
def test_saved_stats_are_read_by_espnet(tmp_path):
    from espnet2.layers.global_mvn import GlobalMVN as EspnetGlobalMVN

    mvn = compute_stats(_utterances(2))
    path = tmp_path / "stats.npz"
    mvn.save_stats(path)
    x, lens = _batch(3, [30, 30])
    ref, _ = EspnetGlobalMVN(path)(x.clone(), lens)
    torch.testing.assert_close(mvn(x, lens)[0], ref, rtol=0, atol=1e-6)


def test_compute_stats_equals_numpy_mean_and_std():
    utts = _utterances(4)
    mixed = [torch.from_numpy(u) if i % 2 else u for i, u in enumerate(utts)]  # arrays and tensors alike
    mvn = compute_stats(iter(mixed))
    frames = np.concatenate(utts).astype(np.float64)  # (N, F)
    assert int(mvn.count) == frames.shape[0]
    np.testing.assert_allclose(mvn.mean.numpy(), frames.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mvn.std.numpy(), frames.std(0), rtol=1e-6)
    y, _ = mvn(torch.from_numpy(frames).float()[None])
    np.testing.assert_allclose(y[0].mean(0).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(y[0].std(0, unbiased=False).numpy(), 1.0, atol=1e-4)


def test_compute_save_load_round_trip(tmp_path):
    mvn = compute_stats(_utterances(5), eps=1e-12)
    path = tmp_path / "stats.npz"
    mvn.save_stats(path)
    assert path.exists()  # written at exactly the given path
    with np.load(path) as f:
        assert sorted(f.files) == ["count", "sum", "sum_square"]
        assert f["count"].dtype == np.int64 and f["sum"].dtype == np.float64
    loaded = GlobalMVN.from_espnet_stats(path, eps=1e-12)
    for name in ("count", "feat_sum", "feat_sum_square", "mean", "std"):
        assert torch.equal(getattr(loaded, name), getattr(mvn, name)), name
    x, lens = _batch(6, [20, 11])
    assert torch.equal(loaded(x, lens)[0], mvn(x, lens)[0])


def test_state_dict_carries_the_statistics():
    a, b = compute_stats(_utterances(7)), compute_stats(_utterances(8))
    assert set(a.state_dict()) == {"count", "feat_sum", "feat_sum_square", "mean", "std"}
    b.load_state_dict(a.state_dict())
    x, lens = _batch(9, [15, 9])
    assert torch.equal(a(x, lens)[0], b(x, lens)[0])


def test_constant_dimension_uses_eps_floor():
    utt = np.ones((10, 3), dtype=np.float32)
    mvn = compute_stats([utt], eps=1e-4)
    np.testing.assert_allclose(mvn.std.numpy(), 1e-2, rtol=1e-6)  # sqrt(max(var=0, eps))


def test_input_is_not_modified_in_place():
    mvn = compute_stats(_utterances(10))
    x, lens = _batch(11, [5, 3])
    before = x.clone()
    mvn(x, lens)
    assert torch.equal(x, before)


# --- bad input: one test each ---


def test_stats_file_missing_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, count=3, sum=np.zeros(4))
    with pytest.raises(ValueError, match="sum_square"):
        GlobalMVN.from_espnet_stats(path)


def test_stats_file_not_npz(tmp_path):
    path = tmp_path / "stats.npy"
    np.save(path, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="npz"):
        GlobalMVN.from_espnet_stats(path)


def test_zero_count():
    with pytest.raises(ValueError, match="count"):
        GlobalMVN(0, np.zeros(3), np.zeros(3))


def test_mismatched_sum_shapes():
    with pytest.raises(ValueError, match="feat_sum"):
        GlobalMVN(5, np.zeros(3), np.zeros(4))


def test_compute_stats_empty():
    with pytest.raises(ValueError, match="feats"):
        compute_stats([])


def test_compute_stats_mixed_dims():
    with pytest.raises(ValueError, match=r"feats\[1\]"):
        compute_stats([np.zeros((4, 3)), np.zeros((4, 5))])


def test_forward_wrong_feature_dim():
    mvn = compute_stats(_utterances(12))
    with pytest.raises(ValueError, match="in_dim=80"):
        mvn(torch.zeros(1, 5, 40))


def test_forward_integer_features():
    mvn = compute_stats(_utterances(13))
    with pytest.raises(TypeError, match="floating"):
        mvn(torch.zeros(1, 5, 80, dtype=torch.int64))


def test_forward_lengths_beyond_time():
    mvn = compute_stats(_utterances(14))
    with pytest.raises(ValueError, match="lengths"):
        mvn(torch.zeros(2, 5, 80), torch.tensor([5, 6]))
