"""``SkipReport``: how many data items were skipped, for which reason, with a few examples of each.

The manifest readers and :class:`~ebranchformer.asr.data.AudioDataset` never crash on one bad item; they skip it
and record it here. Reasons are short human phrases (``"missing audio"``, ``"empty transcript"``, ...); the
report keeps the order in which reasons were first seen and up to ``max_examples`` examples (ids or paths) each.

Example:
    >>> r = SkipReport()
    >>> r.add("missing audio", "a.wav"); r.add("empty transcript", "utt2"); r.add("empty transcript", "utt3")
    >>> str(r)
    'skipped 3 utterances: 1 missing audio, 2 empty transcript'
    >>> r.total, r.counts["empty transcript"], r.examples["empty transcript"]
    (3, 2, ['utt2', 'utt3'])
"""

from __future__ import annotations

__all__ = ["SkipReport"]


class SkipReport:
    """Counts of skipped items per reason, with the first ``max_examples`` examples (ids/paths) of each.

    Attributes:
        counts: ``{reason: count}`` in first-seen order.
        examples: ``{reason: [example, ...]}``, at most ``max_examples`` per reason.
        max_examples: how many examples to keep per reason (default 3).
    """

    def __init__(self, max_examples: int = 3) -> None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 0:
            raise ValueError(f"max_examples must be an int >= 0, got {max_examples!r}")
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: object | None = None, count: int = 1) -> None:
        """Record ``count`` skipped items for ``reason``; ``example`` (an id or path) is kept if room is left."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason must be a non-empty string, got {reason!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        self.counts[reason] = self.counts.get(reason, 0) + count
        shown = self.examples.setdefault(reason, [])
        if example is not None and len(shown) < self.max_examples:
            shown.append(str(example))

    @property
    def total(self) -> int:
        """Number of skipped items over all reasons."""
        return sum(self.counts.values())

    def merge(self, *others: SkipReport) -> SkipReport:
        """A new report with the counts of ``self`` and ``others`` added up (examples kept in order, capped)."""
        out = SkipReport(self.max_examples)
        for report in (self, *others):
            if not isinstance(report, SkipReport):
                raise TypeError(f"can only merge SkipReport objects, got {type(report).__name__}")
            for reason, n in report.counts.items():
                out.counts[reason] = out.counts.get(reason, 0) + n
                shown = out.examples.setdefault(reason, [])
                room = out.max_examples - len(shown)
                shown.extend(report.examples.get(reason, [])[: max(room, 0)])
        return out

    def clear(self) -> None:
        """Forget all counts and examples."""
        self.counts.clear()
        self.examples.clear()

    def __bool__(self) -> bool:
        return self.total > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SkipReport):
            return NotImplemented
        return self.counts == other.counts and self.examples == other.examples

    def __str__(self) -> str:
        n = self.total
        head = f"skipped {n} utterance{'' if n == 1 else 's'}"
        if n == 0:
            return head
        return head + ": " + ", ".join(f"{c} {reason}" for reason, c in self.counts.items())

    def __repr__(self) -> str:
        return f"SkipReport(counts={self.counts!r}, examples={self.examples!r})"
