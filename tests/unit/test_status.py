"""Lag and RPO come from journal seqs and capture times, not from the broker."""
import pytest

from journal.status import Beat, latest, pair_status


def beat(role, seq, at, epoch=1, epoch_bytes=0, captured_at=0, instance="x"):
    return Beat("p", role, instance, "h", 1, at, "s", epoch, seq, epoch_bytes, captured_at)


def test_lag_in_ops_and_bytes_and_rpo():
    beats = latest([beat("capturer", 10, 1000, epoch_bytes=5000),
                    beat("capturer", 20, 2000, epoch_bytes=9000),
                    beat("applier", 12, 1500, epoch_bytes=6000, captured_at=900, instance="t")])
    st = pair_status("p", beats, now_ms=3900)
    (rep,) = st.replicas
    assert st.captured_seq == 20
    assert (rep.lag_ops, rep.lag_bytes) == (8, 3000)
    assert rep.rpo_s == 3.0


def test_caught_up_replica_has_zero_rpo():
    beats = latest([beat("capturer", 20, 2000), beat("applier", 20, 2500, instance="t")])
    (rep,) = pair_status("p", beats, 10_000).replicas
    assert (rep.lag_ops, rep.rpo_s) == (0, 0.0)


def test_replica_behind_an_epoch_lags_by_the_whole_new_epoch():
    beats = latest([beat("capturer", 7, 2000, epoch=2, epoch_bytes=700),
                    beat("applier", 90, 1900, epoch=1, instance="t")])
    (rep,) = pair_status("p", beats, 3000).replicas
    assert (rep.lag_ops, rep.lag_bytes) == (7, 700)


def test_newest_beat_of_a_role_on_an_instance():
    from journal.status import newest
    beats = [beat("capturer", 1, 100, instance="a"), beat("capturer", 2, 300, instance="b"),
             beat("capturer", 3, 200, instance="a"), beat("applier", 9, 900, instance="a")]
    assert newest(beats, "p", "capturer").seq == 2
    assert newest(beats, "p", "capturer", "a").seq == 3
    assert newest(beats, "p", "applier", "b") is None
    assert newest(beats, "other", "capturer") is None


def test_the_history_base_beat_gives_the_window_held_bytes_and_oldest_point():
    base = Beat("p", "base", "/b.img", "h", 1, 5000, "following", 1, 9, 900, 1000, 0.0,
                {"window_ms": "60000", "low": "40", "high": "90", "held_payload": "12345",
                 "oldest_ms": "2000", "restorable_ms": "1000", "holding": ""})
    st = pair_status("p", latest([beat("capturer", 20, 2000), base]), now_ms=6000)
    h = st.history
    assert (h.window_ms, h.actual_ms, h.held_payload) == (60000, 4000, 12345)
    assert (h.low, h.high, h.restorable_ms, h.base) == (40, 90, 1000, "/b.img")
    assert pair_status("p", latest([beat("capturer", 20, 2000)]), 6000).history is None


# -- from the client's point of view (journal/DESIGN.md rule 8) ---------------------------
def capturer(seq, at, appended, since=0, epoch_bytes=0, appended_bytes=0, newest=0,
             state="capturing", epoch=1):
    detail = {"appended_seq": str(appended), "appended_bytes": str(appended_bytes),
              "appended_at_ms": str(newest), "unjournaled_since_ms": str(since)}
    return Beat("p", "capturer", "x", "h", 1, at, state, epoch, seq, epoch_bytes, 0,
                detail=detail)


def test_a_held_burst_is_lag_and_its_oldest_write_sets_the_rpo():
    """The broker holds seq 20, all applied; seqs 21..50 were acknowledged to clients and
    are held on the source since t=5000: lag 30 ops, RPO the age of the oldest of them."""
    beats = latest([capturer(20, 6000, 50, since=5000, epoch_bytes=9000,
                             appended_bytes=40_000, newest=5900),
                    beat("applier", 20, 6000, epoch_bytes=9000, captured_at=1000,
                         instance="t")])
    (rep,) = pair_status("p", beats, now_ms=8000).replicas
    assert (rep.lag_ops, rep.lag_bytes) == (30, 31_000)
    # Not the age of the last applied capture (7 s): the target missed nothing before 5000.
    assert rep.rpo_s == 3.0


def test_journaled_but_unapplied_ops_bound_the_rpo_by_the_applied_capture():
    """The target lacks journaled ops too: the oldest op it lacks is unknown, but came
    after the entry it ends at was closed (t=1000), so the RPO is at most 7 s."""
    beats = latest([capturer(30, 6000, 50, since=5000),
                    beat("applier", 20, 6000, captured_at=1000, instance="t")])
    (rep,) = pair_status("p", beats, now_ms=8000).replicas
    assert (rep.lag_ops, rep.rpo_s) == (30, 7.0)


def test_a_workload_resuming_after_an_idle_hour_is_not_an_hour_of_rpo():
    """The target ends at seq 20, an entry closed an hour ago; writes resumed at t=3,600,000
    (the capturer's note: every op after 20 appended since then) and are journaled, not
    applied yet: the RPO is at most their age, 2 s, not an hour."""
    hour = 3_600_000
    cap = capturer(30, hour + 1500, 30)
    cap.detail["seq_times"] = f"5:1000,20:{hour},25:{hour + 1000}"
    beats = latest([cap, beat("applier", 20, hour + 1500, captured_at=1000, instance="t")])
    (rep,) = pair_status("p", beats, now_ms=hour + 2000).replicas
    assert (rep.lag_ops, rep.rpo_s) == (10, 2.0)
    # (Note 25, which the target has not reached, bounds nothing: 2 s, not 1.) A target
    # before every note is bounded by its own entry only.
    beats = latest([cap, beat("applier", 4, hour + 1500, captured_at=900, instance="t")])
    assert pair_status("p", beats, now_ms=hour + 2000).replicas[0].rpo_s == hour / 1000 + 1.1


def test_a_target_an_epoch_behind_is_bounded_by_the_new_epochs_first_note():
    cap = capturer(7, 5000, 7, epoch=2)
    cap.detail["seq_times"] = "0:4000,3:4500"
    beats = latest([cap, beat("applier", 90, 4900, epoch=1, captured_at=100, instance="t")])
    assert pair_status("p", beats, now_ms=6000).replicas[0].rpo_s == 2.0


@pytest.mark.parametrize("text", ["", "garbage", "5:", "5:1000,x:2", "1:2:3"])
def test_malformed_seq_times_only_loosen_the_bound(text):
    cap = capturer(30, 6000, 30)
    cap.detail["seq_times"] = text
    beats = latest([cap, beat("applier", 20, 6000, captured_at=1000, instance="t")])
    assert pair_status("p", beats, now_ms=8000).replicas[0].rpo_s == 7.0


def test_seq_times_are_noted_at_most_every_interval_and_only_the_newest_kept():
    from journal.status import SEQ_TIME_EVERY_MS, SEQ_TIMES, SeqTimes, seq_times
    t = SeqTimes()
    for i in range(SEQ_TIMES * 4):
        t.note(i, 1_000 + i * SEQ_TIME_EVERY_MS // 2)    # two appends per interval
    notes = seq_times(t.text())
    assert len(notes) == SEQ_TIMES
    assert [b - a for (_, a), (_, b) in zip(notes, notes[1:])] == \
        [SEQ_TIME_EVERY_MS] * (SEQ_TIMES - 1)
    assert notes[-1] == (SEQ_TIMES * 4 - 2, 1_000 + (SEQ_TIMES * 4 - 2) * SEQ_TIME_EVERY_MS // 2)


def test_nothing_acknowledged_beyond_the_target_is_rpo_zero():
    beats = latest([capturer(20, 6000, 20), beat("applier", 20, 6000, instance="t")])
    (rep,) = pair_status("p", beats, now_ms=9000).replicas
    assert (rep.lag_ops, rep.lag_bytes, rep.rpo_s) == (0, 0, 0.0)


def test_an_unknown_age_is_not_reported_as_a_number():
    """A target without any checkpoint lacking journaled ops: lag known, RPO unknown."""
    beats = latest([capturer(30, 6000, 30), beat("applier", 0, 6000, epoch=0, instance="t")])
    (rep,) = pair_status("p", beats, now_ms=8000).replicas
    assert rep.lag_ops == 30 and rep.rpo_s is None


def test_a_capturer_that_says_nothing_more_counts_as_all_journaled():
    from journal.status import Acknowledged
    b = beat("capturer", 7, 100, epoch_bytes=70, captured_at=90)
    assert Acknowledged.of(b) == Acknowledged.journaled(1, 7, 70, 90)


def test_forced_loss_counts_the_held_burst_from_its_oldest_write():
    from journal.status import Acknowledged, forced_loss
    read = Acknowledged.journaled(1, 20, 9000, 1000)      # what the journal held
    loss = forced_loss(capturer(20, 6000, 50, since=5000, newest=5900), 1, 20, 9000, 1000,
                       read)
    assert (loss.ops, loss.rpo_s) == (30, 1.0)             # heard at 6000, oldest 5000
    assert loss.rpo_max_s == 2.0            # the next beat was due at 6500, late by 7000


def test_forced_loss_of_an_unflushed_tail_the_journal_held():
    from journal.status import Acknowledged, forced_loss
    # The checkpoint is at seq 20 (closed at 1000); the journal held up to 25, the last
    # beat said 22 acknowledged: the journal is newer, 5 ops lost, the oldest after 1000.
    read = Acknowledged.journaled(1, 25, 0, 1500)
    loss = forced_loss(capturer(22, 1400, 22), 1, 20, 0, 1000, read)
    assert (loss.ops, loss.rpo_s) == (5, 0.5) and loss.rpo_max_s == 1.4


def test_forced_loss_after_a_clean_stop_is_what_the_journal_says():
    from journal.status import Acknowledged, forced_loss
    read = Acknowledged.journaled(1, 20, 0, 1000)
    loss = forced_loss(capturer(20, 1200, 20, state="stopped"), 1, 20, 0, 1000, read)
    assert (loss.ops, loss.rpo_s, loss.rpo_max_s) == (0, 0.0, 0.0)
    # Never seen: nothing bounds what it took.
    assert forced_loss(None, 1, 20, 0, 1000, read).rpo_max_s is None


def test_recent_max_is_the_largest_value_within_the_window():
    from journal.status import RecentMax
    m = RecentMax(window=60)
    assert m.value(0.0) == 0.0
    m.note(0.2, 0.0)
    m.note(1.5, 10.0)
    m.note(0.3, 20.0)
    assert m.value(20.0) == 1.5
    assert m.value(69.0) == 1.5          # 10 + 60: still inside
    assert m.value(71.0) == 0.3          # the 1.5 s one aged out; 0.3 s (at 20) did not
    assert m.value(81.0) == 0.0
    m.note(0.1, 90.0)
    m.note(0.4, 91.0)                    # a larger later value replaces smaller earlier ones
    assert m.value(91.0) == 0.4 and len(m._kept) == 1
    # Falling values are all kept, but never past the window, read or not.
    falling = RecentMax(window=60)
    for t in range(1000):
        falling.note(1000.0 - t, float(t))
    assert len(falling._kept) == 61 and falling.value(999.0) == 1000.0 - 939


def test_replica_status_reads_the_slowest_flush_from_the_applier_beat():
    from journal.status import ReplicaStatus
    rep = ReplicaStatus("t", "applying", 1, 5, 0, 0, 0.0, 0.0, 0.1, {"flush_s": "1.250"})
    assert rep.slowest_flush_s == 1.25
    assert ReplicaStatus("t", "applying", 1, 5, 0, 0, 0.0, 0.0, 0.1).slowest_flush_s is None
    bad = ReplicaStatus("t", "applying", 1, 5, 0, 0, 0.0, 0.0, 0.1, {"flush_s": "soon"})
    assert bad.slowest_flush_s is None
