"""The token bucket a pair's journal writer waits on before handing Kafka a record.

One bucket per capture, shared by every publisher (epoch) it starts, so baseline, resend,
verify hashes and live writes all count against the same ``--max-rate``: they all leave
through ``JournalPublisher._produce``, which calls :meth:`TokenBucket.take` once per
record. Counted: record bytes as handed to Kafka, before Kafka's own compression
(librdkafka compresses a batch after it is handed over). On compressible data the link
then carries less than the limit, never more: charging a compression ratio learned from
earlier records let an incompressible burst through at many times the limit once
(tested and dropped: a ratio learned on a writer's pattern blocks, then 32 MiB of random
data, doubled the ETA of a thin link's backlog).

The rate in force is asked of ``rate_of`` (the pair's ``--max-rate`` and
``--rate-schedule``, journal/rates.py) at most once a second, so a schedule's boundary or
a ``x2x pair rate`` change takes effect within a second. A record larger than the
bucket is let through once the bucket is full and leaves it in debt: the long-run rate
is the limit, a burst at most one record plus a quarter second of the rate.
"""
from __future__ import annotations

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
                        self._tokens -= n
                        break
                    wait = min(-self._tokens / rate + 1e-3, RECHECK_S)
                else:
                    self._at, wait = now, RECHECK_S    # paused
                if cancelled():
                    return False
                self._wake.wait(wait)
            self.sent += n
            return True

