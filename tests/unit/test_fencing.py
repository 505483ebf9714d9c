"""The rules of automatic failover (journal/fencing.py), without a broker."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from journal.errors import BadInput
from journal.fencing import (MIN_LEASE_MS, AutoFailover, SourceWatch, auto_failover,
                             margin_ms)
from journal.status import Beat

AUTO = AutoFailover(after_ms=10_000, lease_ms=7_000)


def beat(at_ms: int = 1, seq: int = 1, state: str = "capturing", lease: str = "7000") -> Beat:
    return Beat("p", "capturer", "/src", "h", 1, at_ms, state, 1, seq, 0, at_ms, 0.0,
                {"lease_ms": lease} if lease else {})


@given(st.integers(1000, 10**8), st.one_of(st.none(), st.integers(0, 10**8)))
def test_an_accepted_lease_always_ends_a_margin_before_the_failover(after, lease):
    try:
        a = auto_failover(after, lease)
    except BadInput as e:
        assert "lease" in str(e)
        return
    assert a.lease_ms >= MIN_LEASE_MS
    assert a.lease_ms + margin_ms(after) <= a.after_ms
    assert a.renew_s * 4 == pytest.approx(a.lease_ms / 1000)


def test_a_lease_too_long_is_refused_with_the_longest_that_fits():
    with pytest.raises(BadInput, match=r"--lease 8s or less"):
        auto_failover(10_000, 9_000)
    assert auto_failover(10_000).lease_ms == 8_000
    assert auto_failover(100_000).lease_ms == 90_000       # margin: a tenth


def test_the_watcher_fails_over_only_after_silence_for_the_whole_delay():
    w = SourceWatch(AUTO, now=0.0)
    w.observe(0.0, beat(), 10)
    assert w.verdict(9.9, beat()).armed and not w.verdict(9.9, beat()).fail_over
    # A new beat, or journal progress alone, is a sign of life: the count starts again.
    w.observe(5.0, beat(at_ms=2), 10)
    assert not w.verdict(14.9, beat(at_ms=2)).fail_over
    w.observe(14.0, beat(at_ms=2), 11)
    v = w.verdict(23.9, beat(at_ms=2))
    assert not v.fail_over and v.left_s == pytest.approx(0.1)
    assert w.verdict(24.0, beat(at_ms=2)).fail_over
    # What the watcher could not see is no evidence.
    w.blind(24.0)
    w.observe(24.5, beat(at_ms=2), 11)
    assert not w.verdict(33.0, beat(at_ms=2)).fail_over


@pytest.mark.parametrize("last, why", [
    (None, "was ever seen"),
    (beat(state="stopped"), "stopped cleanly"),
    (beat(state="sealed"), "stopped cleanly"),
    (beat(lease=""), "holds no lease"),
    (beat(lease="9000"), "holds no lease"),     # longer than the pair's: not safe
])
def test_the_watcher_is_not_armed_without_a_source_that_fences_itself(last, why):
    w = SourceWatch(AUTO, now=0.0)
    w.observe(0.0, last, 1)
    v = w.verdict(1000.0, last)
    assert not v.armed and not v.fail_over and why in v.reason
