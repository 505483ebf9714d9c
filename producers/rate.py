"""The token bucket a pair's journal writer waits on before handing Kafka a record.

One bucket per capture, shared by every publisher (epoch) it starts, so baseline, resend,
verify hashes and live writes all count against the same ``--max-rate``: they all leave
through ``JournalPublisher._produce``, which calls :meth:`TokenBucket.take` once per
record. Counted: bytes on the wire, as the user's link counts them. Kafka compresses
records after they are handed over (librdkafka, ``compression.type``), so each record is
charged its length times the compression ratio the producer's statistics show
(``WireRatio``: bytes librdkafka wrote to the broker sockets over the record bytes that
left its queue, a moving estimate, 1.0 until the first figures).

The rate in force is asked of ``rate_of`` (the pair's ``--max-rate`` and
``--rate-schedule``, journal/rates.py) at most once a second, so a schedule's boundary or
a ``x2x pair rate`` change takes effect within a second. A record larger than the
bucket is let through once the bucket is full and leaves it in debt: the long-run rate
is the limit, a burst at most one record plus a quarter second of the rate.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from typing import Callable

from journal.rates import Rate

#: Tokens a bucket holds at most: this many seconds of its rate.
BURST_S = 0.25
#: How often the rate in force is asked again.
RECHECK_S = 1.0


class TokenBucket:
    """Thread-safe; ``take`` blocks until the rate allows ``n`` more bytes."""

    def __init__(self, rate_of: Callable[[datetime], Rate] = lambda _: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate_of = rate_of
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._rate: Rate = None
        self._checked = -1e9
        self._tokens = 0.0
        self._at = clock()
        #: Record bytes let through, over the capture's life (every publisher):
        #: heartbeats derive the send rate from it.
        self.sent = 0
        self.wire = WireRatio(self)

    def set_rate_of(self, rate_of: Callable[[datetime], Rate]) -> None:
        """A new limit or schedule (``x2x pair rate``): in force at once."""
        with self._lock:
            self._rate_of, self._checked = rate_of, -1e9
            self._wake.notify_all()

    @property
    def rate(self) -> Rate:
        """The rate in force (None: unlimited, 0: paused)."""
        with self._lock:
            return self._current(self._clock())

    def _current(self, now: float) -> Rate:
        if now - self._checked >= RECHECK_S:
            rate = self._rate_of(datetime.now())
            if rate != self._rate:
                self._tokens = min(self._tokens, 0.0)     # no burst saved from before
            self._rate, self._checked = rate, now
        return self._rate

    def take(self, n: int, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Wait until ``n`` bytes may go; False if ``cancelled()`` became true first."""
        with self._lock:
            while True:
                now = self._clock()
                rate = self._current(now)
                if rate is None:
                    self._at = now
                    break
                if rate > 0:
                    cap = max(rate * BURST_S, 1.0)
                    self._tokens = min(cap, self._tokens + (now - self._at) * rate)
                    self._at = now
                    if self._tokens > 0:
                        self._tokens -= n * self.wire.ratio
                        break
                    wait = min(-self._tokens / rate + 1e-3, RECHECK_S)
                else:
                    self._at, wait = now, RECHECK_S    # paused
                if cancelled():
                    return False
                self._wake.wait(wait)
            self.sent += n
            return True


#: librdkafka statistics this often, for the ratio.
STATS_MS = 1000
#: Fewer record bytes than this in an interval say nothing reliable about the ratio.
MIN_SAMPLE = 256 << 10


class WireRatio:
    """Bytes on the wire per record byte, from the journal producer's statistics
    (``producer_settings`` adds the callback to a producer's configuration)."""

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.ratio = 1.0
        self._last: dict[str, tuple[int, int]] = {}     # producer -> (tx, left queue)

    def producer_settings(self) -> dict:
        return {"statistics.interval.ms": STATS_MS, "stats_cb": self.on_stats}

    def on_stats(self, text: str) -> None:
        try:
            s = json.loads(text)
            tx = sum(b.get("txbytes", 0) for b in s["brokers"].values()
                     if b.get("nodeid", -1) >= 0)
            name, queued = s["name"], int(s.get("msg_size", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        left = self.bucket.sent - queued         # record bytes that left librdkafka's queue
        before = self._last.get(name)
        if before is None or left - before[1] >= MIN_SAMPLE:
            self._last[name] = (tx, left)
        if before is not None and left - before[1] >= MIN_SAMPLE:
            sample = min(1.5, max(0.02, (tx - before[0]) / (left - before[1])))
            self.ratio = 0.5 * self.ratio + 0.5 * sample
