"""The capturer's lease, for a pair with automatic failover (journal/fencing.py).

Each heartbeat is a renewal once the broker acknowledges it, counted from when it was
sent. When no renewal is acknowledged for longer than the lease, the capturer is fenced:
it stops acknowledging writes, for good (until restarted), so that a target promoted
after ``--after`` never has a source that kept writing."""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("x2x.capture")


class Lease:
    """Thread-safe; ``check`` is cheap enough for every client request."""

    def __init__(self, pair: str, lease_s: float) -> None:
        self.pair, self.lease_s = pair, lease_s
        self._lock = threading.Lock()
        # The capturer reached the broker to start (it read the pair's state): a renewal.
        self._renewed = time.monotonic()
        self._fenced: str | None = None

    @property
    def fenced(self) -> str | None:
        """Why writes are refused; None while the lease holds."""
        return self._fenced

    def renewed(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (monotonic) was acknowledged by the broker."""
        with self._lock:
            if self._fenced is None and sent_at > self._renewed:
                self._renewed = sent_at

    def check(self) -> str | None:
        """Fence now if the lease ran out; why writes are refused, or None."""
        if self._fenced is not None:
            return self._fenced
        age = time.monotonic() - self._renewed
        if age <= self.lease_s:
            return None
        with self._lock:
            if self._fenced is None:
                self._fenced = (f"the lease of pair {self.pair} ({self.lease_s:g} s) was not "
                                f"renewed through the broker for {age:.1f} s: the target may "
                                f"be promoted, so this source takes no more writes")
                log.critical("pair %s fenced: %s; writes fail with EIO until the capturer is "
                             "restarted (check 'x2x pair show %s' first: after a failover the "
                             "old source comes back with 'x2x pair failback')",
                             self.pair, self._fenced, self.pair)
        return self._fenced
