"""SpecAugment (Park et al. 2019) on log-mel features (B, T, F), with ESPnet's ``SpecAug`` options.

Applied in ESPnet's order: time warp, frequency masks, time masks. Unlike ESPnet's batch-wide draws,
everything is drawn per row and kept inside that row's valid region (frames ``t < lengths[b]``); padded frames
are returned untouched.

* Time warp (``time_warp_window`` W > 0; ESPnet's ``TimeWarp``): a row of length L > 2W is split at ``c ~
  U_int[W, L - W)``; the part ``[0, c)`` is resized to ``w ~ U_int[c - W, c + W) + 1`` frames and the part
  ``[c, L)`` to ``L - w`` frames with ``torch.nn.functional.interpolate`` (``time_warp_mode``, ESPnet's
  default "bicubic"). Rows with L <= 2W are left as they are. (ESPnet warps all rows alike when their lengths
  are equal; here each row gets its own warp.)
* Frequency masks (``num_freq_masks`` per row): width ``~ U_int[lo, hi)`` from ``freq_mask_width`` (half-open,
  as ESPnet's ``freq_mask_width_range``), at most F, start ``~ U_int[0, F - width]``; applied on valid frames.
* Time masks (``num_time_masks`` per row): width ``~ U_int[lo, hi)`` from ``time_mask_width`` (frames), or
  from ``[floor(L * r0), floor(L * r1))`` with ``time_mask_width_ratio=(r0, r1)`` (ESPnet's
  ``time_mask_width_ratio_range``, here with the row's own length L; no masks when that range is empty); at
  most L wide, start ``~ U_int[0, L - width]``.
* Masked values are 0.0 (``replace_with_zero=True``) or the mean over the valid entries of the batch.

Randomness comes from the ``generator`` passed to ``forward`` (a CPU ``torch.Generator``) or else torch's
global CPU generator, so ``torch.manual_seed`` / a seeded generator give the same result on any device.

The module always applies; the model calls it only in training mode.

Example:
    >>> import torch
    >>> from ebranchformer.asr.specaug import SpecAugment
    >>> aug = SpecAugment(time_warp_window=5, num_freq_masks=2, freq_mask_width=(0, 27), num_time_masks=10,
    ...                   time_mask_width_ratio=(0.0, 0.05))
    >>> g = torch.Generator().manual_seed(0)
    >>> y, lens = aug(torch.randn(2, 300, 80), torch.tensor([300, 200]), generator=g)
    >>> tuple(y.shape)
    (2, 300, 80)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ebranchformer.asr.feature_checks import check_features
from ebranchformer.config import ConfigBase, check
from ebranchformer.nn.masking import lengths_to_valid

__all__ = ["SpecAugConfig", "SpecAugment"]

_MODES = ("bicubic", "bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class SpecAugConfig(ConfigBase):
    """SpecAugment options (ESPnet ``SpecAug`` names in brackets). Defaults: ESPnet's E-Branchformer recipes.

    Attributes:
        time_warp_window: W of the time warp, 0 disables it [time_warp_window]. Default 5.
        time_warp_mode: "bicubic" | "bilinear" | "nearest" [time_warp_mode]. Default "bicubic".
        num_freq_masks: frequency masks per row, 0 disables [num_freq_mask]. Default 2.
        freq_mask_width: half-open (lo, hi) width range in bins; an int n means (0, n)
            [freq_mask_width_range]. Default (0, 27).
        num_time_masks: time masks per row, 0 disables [num_time_mask]. Default 10.
        time_mask_width: half-open (lo, hi) width range in frames, or None [time_mask_width_range].
        time_mask_width_ratio: half-open (r0, r1) width range as fractions of the row's length, or None
            [time_mask_width_ratio_range]. Exactly one of the two may be set; when neither is, the ratio range
            (0.0, 0.05) is used.
        replace_with_zero: fill masks with 0.0, else with the batch mean [replace_with_zero]. Default True.
    """

    _tuple_fields = ("freq_mask_width", "time_mask_width", "time_mask_width_ratio")

    time_warp_window: int = 5
    time_warp_mode: str = "bicubic"
    num_freq_masks: int = 2
    freq_mask_width: tuple[int, int] = (0, 27)
    num_time_masks: int = 10
    time_mask_width: tuple[int, int] | None = None
    time_mask_width_ratio: tuple[float, float] | None = None
    replace_with_zero: bool = True

    def __post_init__(self) -> None:
        for name in ("time_warp_window", "num_freq_masks", "num_time_masks"):
            v = getattr(self, name)
            check(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"{name} must be an int >= 0, got {v!r}",
            )
        check(
            self.time_warp_mode in _MODES,
            f"time_warp_mode must be one of {_MODES}, got {self.time_warp_mode!r}",
        )
        check(
            isinstance(self.replace_with_zero, bool),
            f"replace_with_zero must be a bool, got {self.replace_with_zero!r}",
            TypeError,
        )
        object.__setattr__(self, "freq_mask_width", _range(self.freq_mask_width, "freq_mask_width", int))
        check(
            self.time_mask_width is None or self.time_mask_width_ratio is None,
            "set only one of time_mask_width and time_mask_width_ratio, got both",
        )
        if self.time_mask_width is not None:
            object.__setattr__(self, "time_mask_width", _range(self.time_mask_width, "time_mask_width", int))
        else:
            ratio = (0.0, 0.05) if self.time_mask_width_ratio is None else self.time_mask_width_ratio
            ratio = _range(ratio, "time_mask_width_ratio", float)
            check(ratio[1] <= 1.0, f"time_mask_width_ratio must lie within [0, 1], got {ratio}")
            object.__setattr__(self, "time_mask_width_ratio", ratio)


def _range(value: Any, name: str, kind: type) -> tuple:
    """Normalise an ESPnet width range: a scalar n means (0, n); check 0 <= lo < hi."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (kind(0), value)
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if kind is int:
        ok = ok and all(float(v).is_integer() for v in value)
    check(ok, f"{name} must be a pair (lo, hi) of {kind.__name__}s, got {value!r}", TypeError)
    lo, hi = kind(value[0]), kind(value[1])
    check(0 <= lo < hi, f"{name} must satisfy 0 <= lo < hi, got {value!r}")
    return (lo, hi)


class SpecAugment(nn.Module):
    """Time warp, frequency and time masks within each row's length; see the module docstring.

    Args:
        config: a :class:`SpecAugConfig`, or None to build one from ``options`` (its field names).
    """

    def __init__(self, config: SpecAugConfig | None = None, **options: Any) -> None:
        super().__init__()
        if config is None:
            config = SpecAugConfig(**options)
        elif options:
            raise TypeError(f"pass either config or options, not both (got options {sorted(options)})")
        if not isinstance(config, SpecAugConfig):
            raise TypeError(f"config must be a SpecAugConfig, got {type(config).__name__}")
        self.config = config

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment.

        Args:
            x: float features (B, T, F).
            lengths: integer (B,) in [1, T]; None means all T.
            generator: CPU torch.Generator for the random draws; None uses torch's global generator.

        Returns:
            (augmented features (B, T, F), lengths int64 (B,) unchanged).
        """
        lengths = check_features(x, lengths)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        c = self.config
        lens_cpu = lengths.cpu()  # (B,)
        valid = lengths_to_valid(lengths, x.shape[1])  # (B, T)
        if c.time_warp_window > 0:
            x = self._time_warp(x, lens_cpu, generator)
        if c.num_freq_masks > 0:
            n_freq = torch.full_like(lens_cpu, x.shape[2])  # (B,)
            lo, hi = c.freq_mask_width
            mask = _span_mask(n_freq, lo, hi, c.num_freq_masks, x.shape[2], generator).to(x.device)  # (B, F)
            x = self._fill(x, mask[:, None, :] & valid[:, :, None], valid)
        if c.num_time_masks > 0:
            if c.time_mask_width is not None:
                lo, hi = c.time_mask_width
            else:
                r0, r1 = c.time_mask_width_ratio
                lo = torch.floor(lens_cpu.double() * r0).long()  # (B,)
                hi = torch.minimum(torch.floor(lens_cpu.double() * r1).long(), lens_cpu)  # (B,)
            mask = _span_mask(lens_cpu, lo, hi, c.num_time_masks, x.shape[1], generator).to(
                x.device
            )  # (B, T)
            x = self._fill(x, mask[:, :, None], valid)
        return x, lengths

    def _fill(self, x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x with ``mask`` (broadcastable to (B, T, F)) set to 0.0 or the mean of the valid entries."""
        if self.config.replace_with_zero:
            value = 0.0
        else:
            n = valid.sum().clamp(min=1) * x.shape[2]
            value = (x * valid[:, :, None].to(x.dtype)).sum() / n  # scalar tensor
        return x.masked_fill(mask, value)

    def _time_warp(
        self, x: torch.Tensor, lens_cpu: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Warp each row of length L > 2W around a random centre; padded frames untouched."""
        c = self.config
        w = c.time_warp_window
        kw = {} if c.time_warp_mode == "nearest" else {"align_corners": False}
        out = x.clone()
        for b, length in enumerate(lens_cpu.tolist()):
            if length - w <= w:
                continue
            center = int(torch.randint(w, length - w, (1,), generator=generator))
            warped = int(torch.randint(center - w, center + w, (1,), generator=generator)) + 1
            row = x[b, :length][None, None]  # (1, 1, L, F)
            left = nn.functional.interpolate(
                row[:, :, :center], (warped, x.shape[2]), mode=c.time_warp_mode, **kw
            )
            right = nn.functional.interpolate(
                row[:, :, center:], (length - warped, x.shape[2]), mode=c.time_warp_mode, **kw
            )
            out[b, :length] = torch.cat([left, right], dim=2)[0, 0]  # (L, F)
        return out


def _span_mask(
    extent: torch.Tensor,
    lo: int | torch.Tensor,
    hi: int | torch.Tensor,
    num: int,
    size: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Union of ``num`` random spans per row, drawn on the CPU: (B, size) bool.

    ``extent``, ``lo`` and ``hi`` are int64 (B,) on the CPU (``lo``/``hi`` may be ints). Row b gets spans of
    width ``~ U_int[lo[b], hi[b])`` (none where hi <= lo), at most ``extent[b]``, starting at ``~ U_int[0,
    extent[b] - width]``, so every span lies within ``[0, extent[b])``.
    """
    lo = torch.as_tensor(lo, dtype=torch.int64).expand(extent.shape)  # (B,)
    hi = torch.as_tensor(hi, dtype=torch.int64).expand(extent.shape)  # (B,)
    u_width = torch.rand((extent.shape[0], num), generator=generator, dtype=torch.float64)  # (B, num)
    u_start = torch.rand((extent.shape[0], num), generator=generator, dtype=torch.float64)  # (B, num)
    span = (hi - lo).clamp(min=0)[:, None]  # (B, 1)
    width = torch.where(span > 0, lo[:, None] + torch.floor(u_width * span).long(), 0)  # (B, num)
    width = torch.minimum(width, extent[:, None])  # (B, num)
    start = torch.floor(u_start * (extent[:, None] - width + 1)).long()  # (B, num)
    pos = torch.arange(size)[None, None, :]  # (1, 1, size)
    inside = (start[:, :, None] <= pos) & (pos < (start + width)[:, :, None])  # (B, num, size)
    return inside.any(dim=1)  # (B, size)
