"""Bandwidth limits, schedules, the token bucket and the link's states (issue #18)."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings, strategies as st

from journal.errors import BadInput
from journal.events import RateSet
from journal.linkstate import STALLED_S, eta, link_state
from journal.pairs import fold
from journal.rates import (MIN_RATE, LinkLimit, format_rate, parse_rate, parse_schedule)
from journal.spec import PairSpec
from journal.events import Created
from journal.status import Beat
from producers.rate import TokenBucket

MON_9 = datetime(2026, 11, 30, 9, 0)     # a Monday


@pytest.mark.parametrize("text,bps", [
    ("20Mbit", 2_500_000), ("20 Mbit/s", 2_500_000), ("10mbit", 1_250_000),
    ("500Kbit", 62_500), ("1Gbit", 125_000_000), ("2.5MB", 2_500_000),
    ("4MiB", 4 << 20), ("64KiB", 64 << 10), ("unlimited", None), ("pause", 0), ("0", 0)])
def test_rates_as_users_write_them(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text,says", [
    ("20mb", "ambiguous"), ("20", "no unit"), ("fast", "not a rate"),
    ("20Xbit", "unknown unit"), ("1bit", "below"), ("-5Mbit", "not a rate"),
    ("20 Mbit x", "not a rate")])
def test_a_malformed_rate_is_refused_naming_what_is_wrong(text, says):
    with pytest.raises(BadInput, match=says) as e:
        parse_rate(text, "--max-rate")
    assert "--max-rate" in str(e.value) and repr(text) in str(e.value)


@given(st.integers(MIN_RATE, 10 ** 11))
def test_a_formatted_rate_parses_back_within_its_rounding(bps):
    back = parse_rate(format_rate(bps).replace(" ", ""))
    assert abs(back - bps) <= bps * 0.01


@given(st.floats(0.001, 1e4), st.sampled_from(["Kbit", "Mbit", "Gbit"]))
def test_bits_are_an_eighth_of_bytes(number, unit):
    text = f"{number:.3f}{unit}"
    bps = float(f"{number:.3f}") * {"Kbit": 1e3, "Mbit": 1e6, "Gbit": 1e9}[unit] / 8
    if bps < MIN_RATE:
        with pytest.raises(BadInput):
            parse_rate(text)
    else:
        assert abs(parse_rate(text) - bps) <= bps * 1e-3 + 1


def test_the_schedule_of_the_issue():
    s = parse_schedule("Mon-Fri 08:00-18:00=10Mbit,*=unlimited")
    assert s.rate_at(MON_9) == 1_250_000
    assert s.rate_at(MON_9.replace(hour=18)) is None
    assert s.rate_at(MON_9 + timedelta(days=5)) is None          # Saturday
    assert s.rate_at(MON_9 + timedelta(days=4)) == 1_250_000     # Friday


def test_a_night_rule_crosses_midnight_and_falls_back_to_max_rate():
    link = LinkLimit.parse("20Mbit", "Fri 22:00-06:00=pause, Sat+Sun=unlimited")
    fri = MON_9 + timedelta(days=4)
    assert link.rate_at(fri.replace(hour=23)) == 0
    assert link.rate_at(fri.replace(hour=21)) == 2_500_000       # no rule: --max-rate
    assert link.rate_at(fri.replace(hour=5) + timedelta(days=1)) == 0   # Sat 05:00
    assert link.rate_at(fri.replace(hour=7) + timedelta(days=1)) is None
    assert link.rate_at(MON_9.replace(hour=3)) == 2_500_000     # Sun night is not Fri


@given(st.integers(0, 6), st.integers(0, 23), st.integers(0, 59), st.integers(0, 6),
       st.integers(0, 6), st.integers(0, 1439), st.integers(0, 1439))
@settings(max_examples=300)
def test_a_rule_matches_exactly_its_days_and_minutes(day, h, m, d0, d1, a, b):
    if a == b:
        return
    days = "+".join(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[d]
                    for d in sorted({d0, d1}))
    s = parse_schedule(f"{days} {a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}=1Mbit")
    at = MON_9.replace(hour=h, minute=m) + timedelta(days=day)
    minute, wd = h * 60 + m, day
    if a < b:
        want = wd in {d0, d1} and a <= minute < b
    else:
        want = (wd in {d0, d1} and minute >= a) or ((wd - 1) % 7 in {d0, d1} and minute < b)
    assert (s.rate_at(at) == 125_000) == want


@pytest.mark.parametrize("text,says", [
    ("", "empty"), ("Mon-Fri 08:00-18:00", "no '=RATE'"), ("Moon 08:00-09:00=1Mbit", "'Moon'"),
    ("Mon 25:00-26:00=1Mbit", "'25:00' is not a time"), ("Mon 08:00=1Mbit", "HH:MM-HH:MM"),
    ("=1Mbit", "nothing about when"), ("Mon 08:00-08:00=1Mbit", "empty"),
    ("Mon x 08:00-09:00=1Mbit", "expected [DAYS]"), ("*=20mb", "ambiguous"),
    ("Mon-Fri 08:00-18:00=10Mbit,,*=unlimited", "no '=RATE'")])
def test_a_malformed_schedule_is_refused_naming_the_rule(text, says):
    with pytest.raises(BadInput, match=None) as e:
        parse_schedule(text)
    assert says in str(e.value), str(e.value)


def test_the_fold_keeps_the_newest_rate_and_ignores_a_malformed_one():
    spec = PairSpec("p", "/s", "/t", 1 << 20, 4096)
    evs = [Created(pair="p", spec=spec), RateSet(pair="p", max_rate="20Mbit"),
           RateSet(pair="p", max_rate="fast")]
    assert fold(evs)["p"].link.max_rate == 2_500_000
    evs.append(RateSet(pair="p"))
    assert not fold(evs)["p"].link.limited


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_bucket_holds_the_rate_over_records_of_any_size(monkeypatch):
    clock = Clock()
    bucket = TokenBucket(lambda _: 1_000_000, clock)
    # Waits advance the fake clock instead of sleeping.
    monkeypatch.setattr(bucket._wake, "wait", lambda s: setattr(clock, "t", clock.t + s))
    for size in [1 << 20, 4096, 300_000] * 20:
        bucket.take(size)
    sent = bucket.sent
    assert abs(sent / clock.t - 1_000_000) < 0.05 * 1_000_000 + (1 << 20) / clock.t


def test_a_paused_bucket_sends_nothing_until_resumed_or_cancelled(monkeypatch):
    clock = Clock()
    rate = {"r": 0}
    bucket = TokenBucket(lambda _: rate["r"], clock)
    waits = []

    def wait(s):
        waits.append(s)
        clock.t += s
        if len(waits) == 5:
            rate["r"] = None
    monkeypatch.setattr(bucket._wake, "wait", wait)
    assert bucket.take(100)
    assert len(waits) == 5 and bucket.sent == 100
    rate["r"] = 0
    clock.t += 1            # the rate in force is asked again once a second
    assert not bucket.take(100, cancelled=lambda: True)


def beat(state="capturing", at=100_000, **detail):
    return Beat("p", "capturer", "i", "h", 1, at, state, 1, 10, 0, 0, 0.0,
                {k: str(v) for k, v in detail.items()})


def test_link_states_from_the_heartbeat():
    now = 100_000
    assert link_state(None, now).state == "unknown"
    assert link_state(beat("degraded", error="broker stalled"), now).state == "degraded"
    assert link_state(beat(at=now - 30_000), now).state == "stalled"
    assert link_state(beat(max_rate_bps=0, unjournaled_bytes=5), now).state == "paused"
    s = link_state(beat("baseline", baseline_total=100 << 20, baseline_done=25 << 20,
                        unjournaled_bytes=5 << 20, sent_bps=1 << 20, write_bps=0), now)
    assert s.state == "initial-sync" and s.percent == 25 and s.eta_s == 80
    s = link_state(beat(unjournaled_bytes=30 << 20, sent_bps=2 << 20, write_bps=1 << 20,
                        progress_at_ms=now, max_rate_bps=2 << 20), now)
    assert s.state == "backlog" and s.eta_s == 30 and s.limit == "16.8 Mbit/s"
    s = link_state(beat(unjournaled_bytes=30 << 20, sent_bps=0,
                        progress_at_ms=now - int(STALLED_S + 1) * 1000), now)
    assert s.state == "stalled"
    assert link_state(beat(unjournaled_bytes=4096, sent_bps=1 << 20, progress_at_ms=now),
                      now).state == "continuous"


def test_an_eta_is_none_while_the_backlog_grows():
    assert eta(100, 10, 20) is None and eta(0, 0, 0) == 0 and eta(100, 30, 10) == 5


def test_the_control_cache_keeps_the_link():
    import json
    from infra.control_cache import _state_from_json, _state_to_json
    spec = PairSpec("p", "/s", "/t", 1 << 20, 4096)
    p = fold([Created(pair="p", spec=spec),
              RateSet(pair="p", max_rate="20Mbit", schedule="Mon-Fri 08:00-18:00=pause")])["p"]
    back = _state_from_json(json.loads(json.dumps(_state_to_json(p))))
    assert back == p and back.link.rate_at(MON_9) == 0


def test_an_applier_level_with_the_journal_is_not_level_with_a_backlog():
    """Async writes waiting for a thin link are acknowledged and not yet journaled: the
    target is behind them, though it applied all the journal holds."""
    from journal.status import replica_status
    now = 100_000
    cap = Beat("p", "capturer", "i", "h", 1, now - 1000, "capturing", 1, 10, 0, now - 20_000,
               0.0, {"appended_seq": "50"})
    app = Beat("p", "applier", "t", "h", 1, now, "following", 1, 10, 0, now - 20_000)
    assert replica_status(cap, app, now).rpo_s == 20.0
    level = Beat(**{**cap.__dict__, "detail": {"appended_seq": "10"}})
    assert replica_status(level, app, now).rpo_s == 0.0
