"""Lag and RPO come from journal seqs and capture times, not from the broker."""
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
