"""Learning-rate schedules as multipliers of the peak lr, for ``torch.optim.lr_scheduler.LambdaLR``.

``LRSchedule(kind, warmup_steps, total_steps, min_lr_ratio)(k)`` is the factor applied to the configured lr
before optimizer update ``k + 1`` (``k`` = updates done so far, as ``LambdaLR`` counts):

* ``"noam"``: ESPnet's ``WarmupLR``: ``warmup^0.5 * min(n^-0.5, n * warmup^-1.5)`` with ``n = k + 1``: linear
  warm-up to the peak lr at ``n = warmup_steps``, then decay as ``n^-0.5``.
* ``"warmup_cosine"``: linear warm-up ``n / warmup`` to the peak, then a half cosine from the peak down to
  ``min_lr_ratio`` at ``n = total_steps`` (and flat after).
* ``"constant"``: linear warm-up, then 1.0.

The schedule object holds only numbers, so a ``LambdaLR`` state dict built on it stays loadable with
``torch.load(weights_only=True)``.

Example:
    >>> s = LRSchedule("noam", warmup_steps=4)
    >>> [round(s(k), 3) for k in range(6)]
    [0.25, 0.5, 0.75, 1.0, 0.894, 0.816]
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ebranchformer.config import check

__all__ = ["SCHEDULES", "LRSchedule", "build_scheduler"]

SCHEDULES = ("noam", "warmup_cosine", "constant")


@dataclasses.dataclass
class LRSchedule:
    """Multiplier of the peak lr as a function of the number of updates done (see the module doc).

    Attributes:
        kind: "noam", "warmup_cosine" or "constant".
        warmup_steps: updates of linear warm-up (>= 0; 0 means none; "noam" needs >= 1).
        total_steps: updates until the cosine reaches ``min_lr_ratio`` (needed for "warmup_cosine").
        min_lr_ratio: the cosine's final multiplier, in [0, 1]. Default 0.0.
    """

    kind: str
    warmup_steps: int
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check(self.kind in SCHEDULES, f"scheduler must be one of {SCHEDULES}, got {self.kind!r}")
        check(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= (1 if self.kind == "noam" else 0),
            f"warmup_steps must be an int >= {1 if self.kind == 'noam' else 0} for {self.kind!r}, "
            f"got {self.warmup_steps!r}",
        )
        if self.kind == "warmup_cosine":
            check(
                isinstance(self.total_steps, int) and self.total_steps > self.warmup_steps,
                f"warmup_cosine needs total_steps > warmup_steps={self.warmup_steps}, "
                f"got {self.total_steps!r}",
            )
        check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")

    def __call__(self, k: int) -> float:
        n = k + 1  # the update about to happen, 1-based
        w = self.warmup_steps
        if self.kind == "noam":
            return w**0.5 * min(n**-0.5, n * w**-1.5)
        if n <= w:
            return n / w
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (n - w) / (self.total_steps - w))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``schedule`` to each param group's lr (call ``.step()`` after each update)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
