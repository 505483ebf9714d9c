"""Automatic failover without split brain: the rules of the lease and of the watcher.

Kafka is the arbiter. The source's capturer holds a *lease*: every heartbeat it sends is
a renewal once the broker acknowledges it, and the lease runs from when that heartbeat
was **sent**. The target side's watcher counts from when it **saw** the newest heartbeat
or journal progress, which the broker had before the watcher could read it, so after the
sending. Hence, for one and the same last renewal, the source stops acknowledging writes
``lease`` after sending it and the watcher promotes ``after`` after seeing it, which is
later: the source is fenced before the target is promoted whenever

    lease + margin <= after

where the margin covers what the source still completes once its lease ran out (a write
already past its check, the tick that notices) and the watcher's polling. We ask for
``max(2 s, after / 10)``; the clocks involved are each side's monotonic clock, whose
rates differ by far less than that over a failover delay.

A fenced capturer stays fenced (writes fail with EIO) until it is restarted: a renewal
that came back after the watcher decided would otherwise let it take writes that the
promotion then discards. Restarting it is the operator's act, after checking
``x2x pair show``.

Exactly one promotion wins: the fold takes only the first ``promoted`` of a failover
(journal/pairs.py), in the order of the operator's control topic, which the broker
decides; a watcher runs its promotion hook only if the promotion the fold kept is its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from journal.errors import BadInput
from journal.status import Beat, newest

#: The smallest margin between the lease and the failover delay (see above).
MIN_MARGIN_MS = 2000
#: A lease shorter than this could not be renewed often enough by beats.
MIN_LEASE_MS = 2000
#: Renewals per lease: one lost heartbeat does not fence the source.
RENEWALS_PER_LEASE = 4


@dataclass(frozen=True)
class AutoFailover:
    """A pair's automatic failover: promote the target once the source is silent for
    ``after_ms``; the source fences itself once its lease is ``lease_ms`` old."""

    after_ms: int
    lease_ms: int

    @property
    def renew_s(self) -> float:
        """How often the capturer renews its lease (sends a heartbeat)."""
        return self.lease_ms / RENEWALS_PER_LEASE / 1000


def margin_ms(after_ms: int) -> int:
    return max(MIN_MARGIN_MS, after_ms // 10)


def auto_failover(after_ms: int, lease_ms: int | None = None) -> AutoFailover:
    """The settings ``--after``/``--lease`` ask for, or BadInput naming what is wrong.
    Default lease: the longest the margin allows."""
    margin = margin_ms(after_ms)
    if lease_ms is None:
        lease_ms = after_ms - margin
    if lease_ms < MIN_LEASE_MS:
        raise BadInput(f"a lease of {lease_ms} ms is too short to be renewed by heartbeats: "
                       f"use at least {MIN_LEASE_MS // 1000} s (and --after at least "
                       f"{(MIN_LEASE_MS + MIN_MARGIN_MS) // 1000} s)")
    if lease_ms + margin > after_ms:
        raise BadInput(f"the lease ({lease_ms / 1000:g} s) must end at least "
                       f"{margin / 1000:g} s before the failover (--after "
                       f"{after_ms / 1000:g} s), or the target could be promoted while the "
                       f"source still acknowledges writes (split brain); use --lease "
                       f"{(after_ms - margin) / 1000:g}s or less, or a longer --after")
    return AutoFailover(after_ms, lease_ms)


@dataclass(frozen=True)
class Verdict:
    """What the watcher concludes now."""

    armed: bool
    fail_over: bool
    reason: str                  # why (not) armed, or the evidence of the failure
    left_s: float | None = None  # seconds until the failover, while armed


class SourceWatch:
    """The watcher's evidence: when it last saw the source alive (a new capturer
    heartbeat or journal progress), by its own monotonic clock."""

    def __init__(self, auto: AutoFailover, now: float) -> None:
        self.auto = auto
        self._seen: tuple | None = None
        self._since = now

    def observe(self, now: float, beat: Beat | None, journal_end: int) -> None:
        """Record what the broker shows now; anything new counts as a sign of life."""
        key = (beat.at_ms, beat.seq, beat.state) if beat else None, journal_end
        if key != self._seen:
            self._seen, self._since = key, now

    def blind(self, now: float) -> None:
        """The watcher could not read the broker: silence it cannot see is no evidence."""
        self._seen, self._since = None, now

    def verdict(self, now: float, beat: Beat | None) -> Verdict:
        silent = now - self._since
        if beat is None:
            return Verdict(False, False, "no capturer heartbeat was ever seen: nothing to "
                                         "protect yet")
        if beat.state in ("stopped", "sealed"):
            return Verdict(False, False, f"the capturer stopped cleanly ({beat.state}): an "
                                         f"operator's act, not a failure")
        lease = beat.detail.get("lease_ms", "")
        if not lease.isdigit() or int(lease) > self.auto.lease_ms:
            return Verdict(False, False, f"the capturer on {beat.host} holds no lease of at "
                                         f"most {self.auto.lease_ms / 1000:g} s (the scan "
                                         f"capturer never holds one; an NBD capturer of "
                                         f"an older x2x needs a restart)")
        left = self.auto.after_ms / 1000 - silent
        evidence = (f"no capturer heartbeat and no journal progress for {silent:.1f} s "
                    f"(last beat from {beat.host} pid {beat.pid}: {beat.state}, epoch "
                    f"{beat.epoch} seq {beat.seq}; its lease is {int(lease) / 1000:g} s)")
        return Verdict(True, left <= 0, evidence, max(0.0, left))


def failover_status(auto: AutoFailover | None, name: str, source: str,
                    beats: Iterable[Beat], now_ms: int) -> dict[str, Any] | None:
    """Pair ``name``'s automatic failover as ``x2x status`` shows it: the settings, the
    lease its ``source`` holds and each watcher's verdict, from their heartbeats; None
    when off."""
    if auto is None:
        return None
    beats = list(beats)
    cap = newest(beats, name, "capturer", source)
    held = cap.detail.get("lease_ms", "") if cap is not None else ""
    return {"after_ms": auto.after_ms, "lease_ms": auto.lease_ms,
            "source_lease_ms": int(held) if held.isdigit() else None,
            "source_state": cap.state if cap is not None else None,
            "watchers": [{"host": b.host, "target": b.instance, "state": b.state,
                          "failover_in_s": b.detail.get("failover_in_s"),
                          "reason": b.detail.get("reason", ""),
                          "seen_s_ago": (now_ms - b.at_ms) / 1000}
                         for b in beats if b.pair == name and b.role == "watcher"]}
