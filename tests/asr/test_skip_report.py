"""SkipReport: counting, examples, merging and the one-line summary."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebranchformer.asr.skip_report import SkipReport


def test_counts_examples_and_summary_in_first_seen_order():
    r = SkipReport(max_examples=2)
    r.add("missing audio", "a.wav")
    r.add("empty transcript", "u1")
    r.add("empty transcript", "u2")
    r.add("empty transcript", "u3")
    assert r.total == 4
    assert r.counts == {"missing audio": 1, "empty transcript": 3}
    assert r.examples == {"missing audio": ["a.wav"], "empty transcript": ["u1", "u2"]}  # capped at 2
    assert str(r) == "skipped 4 utterances: 1 missing audio, 3 empty transcript"


def test_summary_singular_and_empty():
    r = SkipReport()
    assert str(r) == "skipped 0 utterances" and r.total == 0 and not r
    r.add("bad json")
    assert str(r) == "skipped 1 utterance: 1 bad json" and r
    assert r.examples == {"bad json": []}


def test_add_with_count():
    r = SkipReport()
    r.add("missing audio", "x", count=5)
    assert r.counts == {"missing audio": 5} and r.examples == {"missing audio": ["x"]}


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"reason": ""}, ValueError),
        ({"reason": 3}, ValueError),
        ({"reason": "r", "count": 0}, ValueError),
        ({"reason": "r", "count": True}, ValueError),
    ],
)
def test_add_rejects_bad_arguments(kwargs, exc):
    with pytest.raises(exc, match="reason|count"):
        SkipReport().add(**kwargs)


def test_constructor_and_merge_reject_bad_arguments():
    with pytest.raises(ValueError, match="max_examples"):
        SkipReport(max_examples=-1)
    with pytest.raises(TypeError, match="SkipReport"):
        SkipReport().merge({"a": 1})


reasons = st.sampled_from(["missing audio", "empty transcript", "bad json", "unreadable audio"])
events = st.lists(st.tuples(reasons, st.text(min_size=1, max_size=5)), max_size=30)


@given(events, events)
def test_merge_equals_recording_everything_in_one_report(first, second):
    a, b, both = SkipReport(), SkipReport(), SkipReport()
    for reason, ex in first:
        a.add(reason, ex)
        both.add(reason, ex)
    for reason, ex in second:
        b.add(reason, ex)
        both.add(reason, ex)
    a_counts = dict(a.counts)
    merged = a.merge(b)
    assert merged == both
    assert merged.total == a.total + b.total == len(first) + len(second)
    assert a.counts == a_counts  # inputs untouched
