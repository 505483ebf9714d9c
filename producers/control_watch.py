"""The NBD capturer's ear on the control topic: requests addressed to its source volume.

- ``failover-requested``: refuse further writes (clients get ESHUTDOWN and are
  disconnected), finish requests in flight, fsync, journal SEAL (whole-volume digest),
  drain, stop; answer ``sealed`` (epoch, seq, digest, refused_at_ms).
- ``hashes-requested``: journal HASHES of the whole volume + FLUSH; answer
  ``hashes-published`` (epoch, first entry seq and offset, FLUSH seq, bytes).
- ``resend-requested``: journal the current content of the extents + FLUSH; answer
  ``resent``.

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
from journal.blocks import Extent, parse_extents
from journal.errors import X2XError
from journal.pairs import ControlEvent
from journal.roles import Role
from journal.clock import now_ms

log = logging.getLogger("x2x.capture")


class Requests(Protocol):
    """What a running capturer does for the watch; each returns its answer's attrs, or
    raises X2XError (OSError, ValueError) with the reason it could not."""

    def seal(self) -> dict[str, str]:
        """Refuse writes, journal SEAL, drain and stop (``sealed``)."""
        ...

    def hashes(self) -> dict[str, str]:
        """Journal HASHES of the whole volume and a FLUSH (``hashes-published``)."""
        ...

    def resend(self, extents: list[Extent]) -> dict[str, str]:
        """Journal the current content of ``extents`` and a FLUSH (``resent``)."""
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
        served: set[tuple[str, str, int]] = set()
        while not self._halt.is_set():
            try:
                for ev in follow(self.settings, self.started_ms, self._halt):
                    if ev.pair != self.pair or ev.attrs.get("source") != self.source:
                        continue
                    if ev.attrs.get("forced") == "1":
                        continue    # a forced failover promotes without the source's part
                    key = (ev.event, ev.attrs.get("request", ""), ev.at_ms)
                    if ev.event not in ("failover-requested", "hashes-requested",
                                        "resend-requested") or key in served:
                        continue
                    served.add(key)     # a re-read after a reconnect must not redo it
                    self._serve(ev)
                    if ev.event == "failover-requested":
                        return
            except X2XError as e:
                # The broker is unreachable: keep capturing, listen again shortly.
                log.warning("pair %s: control watch interrupted: %s", self.pair, e)
                self._halt.wait(2.0)

    def _serve(self, ev: ControlEvent) -> None:
        request = ev.attrs.get("request", "")
        base = {"request": request, "source": self.source}
        try:
            if ev.event == "failover-requested":
                answer = ("sealed", self.requests.seal())
            elif ev.event == "hashes-requested":
                answer = ("hashes-published", self.requests.hashes())
            else:
                extents = parse_extents(ev.attrs.get("extents", ""))
                answer = ("resent", self.requests.resend(extents))
        except (X2XError, OSError, ValueError) as e:
            log.error("pair %s: %s failed: %s", self.pair, ev.event, e)
            answer = ("request-failed", {"reason": f"{ev.event}: {e}"[:500]})
        try:
            control.publish(self.settings, ControlEvent(answer[0], self.pair, now_ms(),
                                                        attrs={**base, **answer[1]}),
                            Role.CAPTURER)
        except X2XError as e:
            log.error("pair %s: could not answer %s: %s", self.pair, ev.event, e)
