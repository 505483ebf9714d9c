"""The health of one NBD capturer: is its journal taking what clients write?

One object owns it (the capture service creates it); the journaling backend, the
background threads and recovery report through its methods and read it back, so no two
places can disagree about whether the capturer is degraded, and why.

* ``capturing``: journaling works;
* ``degraded`` (with the reason): journaling stopped; async writes are kept on the source
  and marked in the write-intent bitmap, sync writes fail with EIO;
* ``resending``: journaling works again, in a new epoch that is resending the marked
  extents (also after an unclean stop).

The names are the heartbeat's states (journal/DESIGN.md, Words).
"""
from __future__ import annotations

import enum
import logging
import threading
import time

log = logging.getLogger("x2x.capture")


class Condition(str, enum.Enum):
    """Where a capturer's journal stands."""

    CAPTURING = "capturing"
    DEGRADED = "degraded"
    RESENDING = "resending"


class Health:
    """The capturer's condition, changed only through these methods (thread-safe)."""

    def __init__(self, pair: str = "") -> None:
        self.pair = pair
        self._lock = threading.Lock()
        self._condition = Condition.CAPTURING
        self._reason: str | None = None
        self._since: float | None = None

    @property
    def condition(self) -> Condition:
        return self._condition

    @property
    def reason(self) -> str | None:
        """Why journaling stopped; None unless degraded."""
        return self._reason

    def degraded_for(self) -> float | None:
        """Seconds since it went degraded; None when it is not."""
        with self._lock:
            if self._condition is not Condition.DEGRADED or self._since is None:
                return None
            return time.monotonic() - self._since

    def fail(self, reason: str) -> bool:
        """Journaling stopped for ``reason``. The first reason stands until a new epoch
        takes over (later failures are its consequences). Returns whether this call is
        the one that degraded it."""
        with self._lock:
            if self._condition is Condition.DEGRADED:
                return False
            self._condition, self._reason = Condition.DEGRADED, reason
            self._since = time.monotonic()
        log.error("pair %s degraded: %s; writes are kept on the source and marked; marked "
                  "extents are resent when the broker is back", self.pair, reason)
        return True

    def resending(self) -> None:
        """A new epoch journals again and resends the marked extents."""
        with self._lock:
            self._condition, self._reason, self._since = Condition.RESENDING, None, None

    def resent(self) -> None:
        """The resend's FLUSH is acknowledged: capturing. A failure that came meanwhile
        wins (still degraded), so it is never forgotten."""
        with self._lock:
            if self._condition is Condition.RESENDING:
                self._condition = Condition.CAPTURING
