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
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from infra import control
from infra.control_tail import follow
from journal.errors import X2XError
from journal.events import (REQUESTS, Event, FailoverRequested, HashesPublished,
                            HashesRequested, RequestFailed, ResendRequested, Resent,
                            Sealed)
from journal.roles import Role
from journal.clock import now_ms
from producers.resync import emit_hashes, resend_extents

if TYPE_CHECKING:
    from producers.nbd_capture import NBDCapture

log = logging.getLogger("x2x.capture")


class ControlWatch:
    """A daemon thread serving one capturer's requests, one at a time, in order."""

    def __init__(self, cap: "NBDCapture") -> None:
        self.cap = cap
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
        spec = self.cap.spec
        served: set[tuple[str, str | None, int]] = set()
        while not self._halt.is_set():
            try:
                for ev in follow(self.cap.settings, self.started_ms, self._halt):
                    if not isinstance(ev, REQUESTS) or ev.pair != spec.name \
                            or ev.source != spec.source:
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
                log.warning("pair %s: control watch interrupted: %s", spec.name, e)
                self._halt.wait(2.0)

    def _serve(self, ev: FailoverRequested | HashesRequested | ResendRequested) -> None:
        cap = self.cap
        name, source, request = cap.spec.name, cap.spec.source, ev.request
        answer: Event
        try:
            if cap._stopped:
                raise X2XError("the capturer is stopping")
            if isinstance(ev, FailoverRequested):
                refused_at = now_ms()
                report = cap.stop(seal=True)
                if not report.clean:
                    raise X2XError(f"the capturer could not seal cleanly: "
                                   f"{report.error or 'baseline not finished'}")
                answer = Sealed(pair=name, source=source, request=request, epoch=report.epoch,
                                seq=report.last_seq, digest=cap.sealed_digest,
                                refused_at_ms=refused_at)
            elif isinstance(ev, HashesRequested):
                p = emit_hashes(cap.vol, cap.pub, cap.locks, cap.spec.block_size)
                cap.beat(force=True)
                answer = p.answer(HashesPublished, name, source, request)
            else:
                p = resend_extents(cap.vol, cap.pub, cap.locks, list(ev.extents),
                                   cap.spec.block_size)
                cap.beat(force=True)
                answer = p.answer(Resent, name, source, request)
        except (X2XError, OSError, ValueError) as e:
            log.error("pair %s: %s failed: %s", name, ev.NAME, e)
            answer = RequestFailed(pair=name, source=source, request=request,
                                   reason=f"{ev.NAME}: {e}"[:500])
        try:
            control.publish(cap.settings, answer, Role.CAPTURER)
        except X2XError as e:
            log.error("pair %s: could not answer %s: %s", name, ev.NAME, e)
