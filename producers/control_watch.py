"""The NBD capturer's ear on the control topic: requests addressed to its source volume.

- ``failover-requested``: refuse further writes (clients get ESHUTDOWN and are
  disconnected), finish requests in flight, fsync, journal SEAL (whole-volume digest),
  drain, stop; answer ``sealed`` (epoch, seq, digest, refused_at_ms).
- ``hashes-requested``: journal HASHES of the whole volume + FLUSH; answer
  ``hashes-published`` (epoch, first entry seq and offset, FLUSH seq, bytes).
- ``resend-requested``: journal the current content of the extents + FLUSH; answer
  ``resent``.

- ``rate-set`` (``x2x pair rate``, any source of the pair): the new bandwidth limit is
  in force at once (``Requests.rate``); nothing to answer.

Any failure answers ``request-failed`` with the reason, so the waiting command fails with
it instead of timing out. Only events stamped after the capturer started are acted on.

The watch only listens and answers: the capture service does the work, through the
three calls of :class:`Requests`.
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

from infra import control
from infra.control_tail import follow
from infra.kafka import KafkaSettings
from journal.errors import X2XError
from journal.events import (REQUESTS, AutoFailoverSet, Event, FailoverRequested,
                            HashesPublished, HashesRequested, RateSet, RequestFailed,
                            ResendRequested, Resent, Sealed)
from journal.roles import Role
from journal.clock import now_ms

log = logging.getLogger("x2x.capture")


class Requests(Protocol):
    """What a running capturer does for the watch; each returns the event that answers
    the request, or raises X2XError (OSError, ValueError) with the reason it could not."""

    def seal(self, ev: FailoverRequested) -> Sealed:
        """Refuse writes, journal SEAL, drain and stop."""
        ...

    def hashes(self, ev: HashesRequested) -> HashesPublished:
        """Journal HASHES of the whole volume and a FLUSH."""
        ...

    def auto_failover_changed(self, ev: AutoFailoverSet) -> None:
        """Hold, change or drop the lease of automatic failover (journal/fencing.py)."""
        ...

    def resend(self, ev: ResendRequested) -> Resent:
        """Journal the current content of the request's extents and a FLUSH."""
        ...

    def rate(self, ev: RateSet) -> None:
        """Obey the pair's new bandwidth limit and schedule."""
        ...


class ControlWatch:
    """A daemon thread serving one capturer's requests, one at a time, in order."""

    def __init__(self, pair: str, source: str, settings: KafkaSettings,
                 requests: Requests) -> None:
        self.pair, self.source, self.settings = pair, source, settings
        self.requests = requests
        self.started_ms = now_ms()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="x2x-control-watch",
                                        daemon=True)

    def start(self) -> "ControlWatch":
        self._thread.start()
        return self

    def halt(self) -> None:
        self._halt.set()
        if self._thread is not threading.current_thread():
            self._thread.join()     # a request in progress finishes and is answered

    def _run(self) -> None:
        served: set[tuple[str, str | None, int]] = set()
        while not self._halt.is_set():
            try:
                for ev in follow(self.settings, self.started_ms, self._halt):
                    if isinstance(ev, AutoFailoverSet) and ev.pair == self.pair:
                        self.requests.auto_failover_changed(ev)
                        continue
                    if isinstance(ev, RateSet) and ev.pair == self.pair:
                        self.requests.rate(ev)
                        continue
                    if not isinstance(ev, REQUESTS) or ev.pair != self.pair \
                            or ev.source != self.source:
                        continue
                    if isinstance(ev, FailoverRequested) and ev.forced:
                        continue    # a forced failover promotes without the source's part
                    key = (ev.NAME, ev.request, ev.at_ms)
                    if key in served:
                        continue
                    served.add(key)     # a re-read after a reconnect must not redo it
                    self._serve(ev)
                    if isinstance(ev, FailoverRequested):
                        return
            except X2XError as e:
                # The broker is unreachable: keep capturing, listen again shortly.
                log.warning("pair %s: control watch interrupted: %s", self.pair, e)
                self._halt.wait(2.0)

    def _serve(self, ev: FailoverRequested | HashesRequested | ResendRequested) -> None:
        answer: Event
        try:
            if isinstance(ev, FailoverRequested):
                answer = self.requests.seal(ev)
            elif isinstance(ev, HashesRequested):
                answer = self.requests.hashes(ev)
            else:
                answer = self.requests.resend(ev)
        except (X2XError, OSError, ValueError) as e:
            log.error("pair %s: %s failed: %s", self.pair, ev.NAME, e)
            answer = RequestFailed(pair=self.pair, source=self.source, request=ev.request,
                                   reason=f"{ev.NAME}: {e}"[:500])
        try:
            control.publish(self.settings, answer, Role.CAPTURER)
        except X2XError as e:
            log.error("pair %s: could not answer %s: %s", self.pair, ev.NAME, e)
