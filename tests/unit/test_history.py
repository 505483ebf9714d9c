"""The bounded journal's rules (journal/history.py): what the history base may delete."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from journal.errors import BadInput
from journal.history import (HistorySettings, Mark, Reader, base_cut_ms, deletable_below,
                             base_limit, readers_of,
                             format_duration, held_payload, oldest_restorable_ms,
                             parse_duration)
from journal.events import Created, HistorySet
from journal.pairs import PairSpec, fold
from schemas.control import decode_event, encode_event

GiB = 1 << 30
NOW = 10**12


def test_durations_and_sizes_parse_as_users_write_them() -> None:
    assert parse_duration("24h") == 86_400_000
    assert parse_duration("90s") == parse_duration("90") == 90_000
    assert parse_duration("1500ms") == 1500 and parse_duration("7d") == 7 * 86_400_000
    h = HistorySettings.parse("24h", "50GiB")
    assert h == HistorySettings(86_400_000, 50 * GiB) and h.bounded
    assert not HistorySettings.parse(None, None).bounded
    assert not HistorySettings.parse("forever", None).bounded


@pytest.mark.parametrize("history,limit,words", [
    ("yesterday", None, "not a duration"), ("0s", None, "outside 1s..30d"),
    ("31d", None, "outside 1s..30d"), ("1h", "1MiB", "below 16MiB"),
    (None, "50GiB", "give --history too")])
def test_bad_settings_are_refused_with_the_way_out(history, limit, words) -> None:
    with pytest.raises(BadInput, match=words):
        HistorySettings.parse(history, limit)


@given(st.integers(16 << 20, 1 << 50))
def test_a_size_prints_back_to_itself(n: int) -> None:
    from journal.history import format_size
    from journal.pairs import parse_size
    assert parse_size(format_size(n)) == n


@given(st.integers(1, 30 * 86_400_000))
def test_a_duration_prints_back_to_itself(ms: int) -> None:
    assert parse_duration(format_duration(ms)) == ms


@given(st.one_of(st.none(), st.integers(1000, 10**9)), st.one_of(st.none(), st.integers(16 << 20, 1 << 50)))
def test_settings_round_trip_through_the_control_record(window, limit) -> None:
    h = HistorySettings(window, limit)
    ev = decode_event(encode_event(HistorySet(pair="p", window_ms=window, journal_max=limit)))
    assert HistorySettings(ev.window_ms, ev.journal_max) == h
    assert 1 << 20 <= h.segment_bytes <= 1 << 30


def test_the_window_is_folded_from_the_control_topic_and_changes_later() -> None:
    spec = PairSpec("p", "/a", "/b", 65536, 1 << 20)
    evs = [Created(pair="p", at_ms=0, spec=spec)]
    assert not fold(evs)["p"].history.bounded          # old pairs keep everything
    evs.append(HistorySet(pair="p", at_ms=1, window_ms=3_600_000))
    assert fold(evs)["p"].history.window_ms == 3_600_000
    evs.append(HistorySet(pair="p", at_ms=2))
    assert not fold(evs)["p"].history.bounded


def test_the_base_applies_only_what_left_the_window() -> None:
    assert base_cut_ms(NOW, HistorySettings()) is None
    assert base_cut_ms(NOW, HistorySettings(60_000)) == NOW - 60_000


def test_nothing_is_deleted_before_the_base_has_a_checkpoint() -> None:
    assert deletable_below(-1, [], 0, NOW) == 0
    assert deletable_below(-1, [], 7, NOW) == 7


def test_deletion_stops_at_the_base_and_at_the_slowest_registered_reader() -> None:
    assert deletable_below(100, [], 0, NOW) == 100
    readers = [Reader("t", 40, NOW - 1000), Reader("r", 90, NOW)]
    assert deletable_below(100, readers, 0, NOW) == 40
    # A released reader (a point-in-time replica that reached its point) holds nothing.
    assert deletable_below(100, [Reader("pit", None, NOW)], 0, NOW) == 100
    # A reader silent for longer than the TTL is no longer registered.
    assert deletable_below(100, [Reader("gone", 5, NOW - 10_001)], 0, NOW, 10_000) == 100
    # A reader without a checkpoint needs everything.
    assert deletable_below(100, [Reader("new", -1, NOW)], 0, NOW) == 0


@given(st.integers(-1, 10**6), st.integers(0, 10**6),
       st.lists(st.tuples(st.one_of(st.none(), st.integers(-1, 10**6)),
                          st.integers(0, 10**5)), max_size=6),
       st.integers(1, 10**5))
def test_deletion_never_passes_the_base_or_a_live_reader_and_never_goes_back(
        base, low, raw, ttl) -> None:
    readers = [Reader(str(i), needs, NOW - age) for i, (needs, age) in enumerate(raw)]
    got = deletable_below(base, readers, low, NOW, ttl)
    assert got >= low                                     # the journal's start only grows
    if got > low:
        assert got <= base                                # the base's record stays
        for r in readers:
            if r.needs is not None and NOW - r.seen_ms <= ttl:
                assert got <= max(r.needs, 0)             # what a reader needs stays


def test_held_bytes_and_the_oldest_restorable_point() -> None:
    oldest = Mark(10, 3, 5000, 1000, 111)
    assert held_payload(oldest, 3, 9000) == 5000
    assert held_payload(oldest, 4, 100) is None           # spans epochs: unknown
    assert held_payload(None, 3, 9000) == 0
    first, base = Mark(0, 1, 10, 10, 100), Mark(50, 1, 500, 10, 500)
    assert oldest_restorable_ms(0, first, base) == 100    # nothing deleted yet
    assert oldest_restorable_ms(20, first, base) == 500   # from the base on
    assert oldest_restorable_ms(20, first, None) is None


def test_readers_register_through_their_newest_heartbeat() -> None:
    from journal.status import Beat

    def beat(inst, at, **detail):
        return Beat("p", "applier", inst, "h", 1, at, "following", 1, 1, 1, 1, 0.0, detail)
    beats = [beat("t", 1, needs="5"), beat("t", 2, needs="9"), beat("pit", 3, needs=""),
             beat("old", 4), Beat("q", "applier", "x", "h", 1, 5, "s", 1, 1, 1, 1)]
    got = {r.instance: r.needs for r in readers_of(beats, "p")}
    assert got == {"t": 9, "pit": None, "old": 0}


def _entry(epoch: int, epoch_bytes: int, at: int, payload: int = 0, closing: bool = True):
    from journal.ops import Entry, Op
    ops = ((Op.write(0, bytes(payload)),) if payload else ()) + ((Op.flush(),) if closing
                                                                   else ())
    return Entry("p", epoch, 1, at, epoch_bytes, ops)


def test_within_its_limit_the_base_applies_only_what_left_the_window() -> None:
    h = HistorySettings(60_000, 100 << 20)
    lim = base_limit(NOW, h, 50 << 20, 2, 50 << 20)
    assert lim.keep_bytes is None
    assert not lim.exceeded_by(_entry(2, 1, NOW - 60_000), 0)
    assert lim.exceeded_by(_entry(2, 1, NOW - 59_999), 0)
    assert base_limit(NOW, HistorySettings(), 10**12, 2, 0) is None


def test_over_its_limit_the_base_applies_whole_points_early_until_the_share_is_left() -> None:
    h = HistorySettings(60_000, 100 << 20)
    recent = NOW - 1000                                  # well inside the window
    lim = base_limit(NOW, h, 150 << 20, 2, 150 << 20)
    assert lim.keep_bytes == 80 << 20
    assert not lim.exceeded_by(_entry(2, 60 << 20, recent), 0)   # 90 MiB from its start
    # A point begun early is applied whole, though less than the share remains after it.
    lim = base_limit(NOW, h, 150 << 20, 2, 150 << 20)
    assert not lim.exceeded_by(_entry(2, 69 << 20, recent, 1024, closing=False), 0)
    assert not lim.exceeded_by(_entry(2, 100 << 20, recent), 0)
    assert lim.exceeded_by(_entry(2, 101 << 20, recent), 0)      # 50 MiB left: kept
    lim = base_limit(NOW, h, 150 << 20, 2, 150 << 20)
    assert not lim.exceeded_by(_entry(1, 10**12, recent), 0)     # an older epoch goes
    assert lim.exceeded_by(_entry(3, 0, recent), 0)              # newer than the head


@given(st.integers(16 << 20, 1 << 30), st.lists(st.integers(1, 8 << 20), min_size=1,
                                                  max_size=40))
def test_early_apply_leaves_at_most_the_share_of_the_limit_above_the_base(limit, sizes) -> None:
    """Points of random sizes, all inside the window: the base applies a prefix of whole
    points, and what remains above it is at most the share (and no more was applied
    than needed)."""
    head = sum(sizes)
    lim = base_limit(NOW, HistorySettings(60_000, limit), head, 1, head)
    done, last_from = 0, None
    for n in sizes:
        if lim.exceeded_by(_entry(1, done + n, NOW, payload=n), 0):
            break
        last_from, done = head - done, done + n
    if lim.keep_bytes is None:
        assert head <= limit and done == 0
    else:
        assert head - done <= lim.keep_bytes
        assert last_from is not None and last_from > lim.keep_bytes
