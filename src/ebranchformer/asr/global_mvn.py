"""Global mean/variance normalisation of features, compatible with ESPnet's ``GlobalMVN`` and its stats file.

ESPnet's ``feats_stats.npz`` holds ``count`` (number of frames), ``sum`` (F,) and ``sum_square`` (F,) over the
training set. From them ``mean = sum / count``, ``var = sum_square / count - mean^2`` and ``std =
sqrt(max(var, eps))`` (computed in float64, kept as float32). The forward pass is ESPnet's with
norm_means=True, norm_vars=True, eps=1e-20 by default: ``x - mean``, padded frames set to 0.0, then ``/ std``
(so padded frames stay 0.0).

Example:
    >>> import torch
    >>> from ebranchformer.asr.global_mvn import compute_stats
    >>> mvn = compute_stats([torch.randn(50, 80) * 3 + 1, torch.randn(20, 80) * 3 + 1])
    >>> y, lens = mvn(torch.randn(2, 50, 80), torch.tensor([50, 20]))
    >>> bool((y[1, 20:] == 0).all())
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ebranchformer.asr.feature_checks import check_features
from ebranchformer.nn.masking import lengths_to_valid

__all__ = ["GlobalMVN", "compute_stats"]


class GlobalMVN(nn.Module):
    """Normalise features (B, T, F) with global statistics.

    Buffers (all in the state_dict): ``count`` int64 (), ``feat_sum`` / ``feat_sum_square`` float64 (F,) (the
    raw statistics, so :meth:`save_stats` can write them back), ``mean`` / ``std`` float32 (F,) (what is
    applied).

    Args:
        count: number of frames the statistics were summed over (positive int).
        feat_sum: per-dimension sum of the features, (F,).
        feat_sum_square: per-dimension sum of squared features, (F,).
        norm_means: subtract the mean. Default True.
        norm_vars: divide by the std. Default True.
        eps: variance floor. Default 1e-20 (ESPnet's).
    """

    def __init__(
        self,
        count: int,
        feat_sum: np.ndarray | torch.Tensor,
        feat_sum_square: np.ndarray | torch.Tensor,
        *,
        norm_means: bool = True,
        norm_vars: bool = True,
        eps: float = 1e-20,
    ) -> None:
        super().__init__()
        count_arr = np.asarray(count)
        if (
            count_arr.shape != ()
            or not np.issubdtype(count_arr.dtype, np.number)
            or count_arr != np.round(count_arr)
        ):
            raise TypeError(f"count must be a positive integer (number of frames), got {count!r}")
        if int(count_arr) <= 0:
            raise ValueError(f"count must be > 0, got {int(count_arr)}")
        total = _as_float64(feat_sum, "feat_sum")  # (F,)
        total_sq = _as_float64(feat_sum_square, "feat_sum_square")  # (F,)
        if total.ndim != 1 or total.shape != total_sq.shape:
            raise ValueError(
                f"feat_sum and feat_sum_square must both have shape (F,), "
                f"got {total.shape} and {total_sq.shape}"
            )
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.norm_means = bool(norm_means)
        self.norm_vars = bool(norm_vars)
        self.eps = float(eps)
        mean = total / int(count_arr)  # (F,)
        std = np.sqrt(np.maximum(total_sq / int(count_arr) - mean * mean, self.eps))  # (F,)
        self.register_buffer("count", torch.tensor(int(count_arr), dtype=torch.int64))
        self.register_buffer("feat_sum", torch.from_numpy(total))
        self.register_buffer("feat_sum_square", torch.from_numpy(total_sq))
        self.register_buffer("mean", torch.from_numpy(mean).float())
        self.register_buffer("std", torch.from_numpy(std).float())

    @property
    def dim(self) -> int:
        """Feature dimension F."""
        return int(self.mean.shape[0])

    def extra_repr(self) -> str:
        means, variances = self.norm_means, self.norm_vars
        return f"dim={self.dim}, count={int(self.count)}, norm_means={means}, norm_vars={variances}"

    @classmethod
    def from_espnet_stats(cls, path: str | os.PathLike, **kwargs) -> GlobalMVN:
        """Load ESPnet's ``feats_stats.npz`` (keys count, sum, sum_square); kwargs as for ``__init__``."""
        path = os.fspath(path)
        try:
            stats = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"path {path!r} is not a readable ESPnet stats .npz file: {e}") from e
        if not isinstance(stats, np.lib.npyio.NpzFile):
            raise ValueError(  # noqa: TRY004 (a file in the wrong format, not an argument of the wrong type)
                f"path {path!r} must be an .npz file with keys count, sum, sum_square"
            )
        with stats:
            missing = sorted({"count", "sum", "sum_square"} - set(stats.files))
            if missing:
                raise ValueError(f"stats file {path!r} lacks keys {missing}; it has {sorted(stats.files)}")
            return cls(stats["count"], stats["sum"], stats["sum_square"], **kwargs)

    def save_stats(self, path: str | os.PathLike) -> None:
        """Write the statistics to exactly ``path`` in ESPnet's npz layout (count int64, sum/sum_square
        float64)."""
        with open(os.fspath(path), "wb") as f:
            np.savez(
                f,
                count=np.asarray(int(self.count), dtype=np.int64),
                sum=self.feat_sum.detach().cpu().double().numpy(),
                sum_square=self.feat_sum_square.detach().cpu().double().numpy(),
            )

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise.

        Args:
            x: float features (B, T, F).
            lengths: integer (B,) in [1, T]; None means all T.

        Returns:
            (normalised features (B, T, F) with padded frames 0.0, lengths int64 (B,)).
        """
        lengths = check_features(x, lengths, self.dim)
        if self.norm_means:
            x = x - self.mean.to(x.dtype)  # (B, T, F)
        valid = lengths_to_valid(lengths, x.shape[1])  # (B, T)
        x = x.masked_fill(~valid[:, :, None], 0.0)  # (B, T, F)
        if self.norm_vars:
            x = x / self.std.to(x.dtype)  # (B, T, F)
        return x, lengths


def compute_stats(feats: Iterable[np.ndarray | torch.Tensor], **kwargs) -> GlobalMVN:
    """Sum the frames of an iterable of (T, F) feature arrays/tensors (float64) into a :class:`GlobalMVN`.

    kwargs (norm_means, norm_vars, eps) are passed to :class:`GlobalMVN`. Raises ValueError for an empty
    iterable, zero frames in total, or items of differing F.
    """
    count, total, total_sq = 0, None, None
    for i, item in enumerate(feats):
        a = _as_float64(item, f"feats[{i}]")
        if a.ndim != 2:
            raise ValueError(f"feats[{i}] must have shape (T, F), got {a.shape}")
        if total is None:
            total, total_sq = np.zeros(a.shape[1]), np.zeros(a.shape[1])  # (F,)
        elif a.shape[1] != total.shape[0]:
            raise ValueError(f"feats[{i}] has F={a.shape[1]}, but earlier items have F={total.shape[0]}")
        count += a.shape[0]
        total += a.sum(axis=0)
        total_sq += (a * a).sum(axis=0)
    if total is None or count == 0:
        raise ValueError("feats must yield at least one (T, F) array with T > 0")
    return GlobalMVN(count, total, total_sq, **kwargs)


def _as_float64(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"{name} must be a numeric numpy array or torch.Tensor, got {_describe(x)}")
    return np.array(x, dtype=np.float64)


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"ndarray of dtype {x.dtype}"
    return type(x).__name__
