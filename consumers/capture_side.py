"""The capturer's part of failover, failback, resync and verify, as consumers/failover.py
sees it: seal the source, journal its block hashes, resend extents.

Done by the live NBD capturer of the source when one serves it (:class:`RemoteCapture`
asks it through the control topic; producers/control_watch.py answers), else on this
host from the capturer's saved state (producers/resync.LocalCapture, which the CLI
hands in). Either way the answer is the event a live capturer publishes.
"""
from __future__ import annotations

import uuid
from typing import Callable, Protocol, TypeVar

from infra import control
from infra.control_tail import wait_event
from infra.kafka import KafkaSettings
from journal.blocks import Extent
from journal.clock import now_ms
from journal.events import (Event, FailoverRequested, HashesPublished, HashesRequested,
                            RequestFailed, ResendRequested, Resent, Sealed)

#: How long a live capturer may take to answer one request.
ANSWER_TIMEOUT = 120.0


class CaptureSide(Protocol):
    """The capturer's part; each returns its answer, the event a live capturer publishes."""

    def seal(self) -> Sealed: ...
    def hashes(self) -> HashesPublished: ...
    def resend(self, extents: list[Extent]) -> Resent: ...


A = TypeVar("A", Sealed, HashesPublished, Resent)


class RemoteCapture:
    """Asks the live NBD capturer of ``source`` through the control topic."""

    def __init__(self, settings: KafkaSettings, pair: str, source: str) -> None:
        self.settings, self.pair, self.source = settings, pair, source

    def _ask(self, make: Callable[..., Event], answer: type[A],
             timeout: float = ANSWER_TIMEOUT) -> A:
        """Publish the request ``make`` builds and wait for its ``answer``; the request
        id ties the two, so an answer to another command is never taken."""
        request, since = uuid.uuid4().hex[:12], now_ms()
        ev = make(pair=self.pair, at_ms=since, source=self.source, request=request)
        control.publish(self.settings, ev)

        def mine(got: Event) -> bool:
            return got.pair == self.pair and getattr(got, "request", None) == request

        got = wait_event(
            self.settings, since, lambda got: mine(got) and isinstance(got, answer), timeout,
            f"the capturer of {self.source} did not answer {ev.NAME}; is it still running? "
            f"(x2x status {self.pair})",
            fail=lambda got: (f"pair {self.pair}: the capturer of {self.source} failed: "
                              f"{got.reason}")
            if mine(got) and isinstance(got, RequestFailed) else None)
        assert isinstance(got, answer)
        return got

    def seal(self) -> Sealed:
        return self._ask(lambda **kw: FailoverRequested(forced=False, **kw), Sealed)

    def hashes(self) -> HashesPublished:
        return self._ask(HashesRequested, HashesPublished)

    def resend(self, extents: list[Extent]) -> Resent:
        return self._ask(lambda **kw: ResendRequested(extents=tuple(extents), **kw), Resent)
