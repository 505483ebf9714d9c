"""Following the control topic as it grows: capturers wait for requests addressed to them,
commands wait for the answers (sealed, promoted, hashes-compared ...).

Read from the start and filtered by time rather than positioned at the end, because the
end (ListOffsets "latest") is what some Kafka-compatible brokers answer wrongly; the
control topic is small.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

from confluent_kafka import Consumer, TopicPartition

from infra.control import accepted, pairs, trusted
from infra.kafka import KafkaSettings
from infra.reader import next_batch
from infra.topics import CONTROL_TOPICS, ensure_base_topics
from journal.errors import BrokerError, X2XError
from journal.events import Event
from journal.pairs import fold


class Timeout(X2XError):
    """An expected answer did not appear on the control topic in time."""


def follow(settings: KafkaSettings, since_ms: int,
           stop: threading.Event | None = None, poll: float = 0.2) -> Iterator[Event]:
    """Yield control events stamped at or after ``since_ms``, as they arrive, until
    ``stop`` is set or the caller stops iterating. Foreign records are skipped, and so
    are a keyed pair's events not signed with its key (infra/control.trusted)."""
    ensure_base_topics(settings.check_reachable())
    known = pairs(settings)
    consumer = Consumer(settings.follower())
    try:
        consumer.assign([TopicPartition(t, 0, 0) for t in CONTROL_TOPICS])
        while stop is None or not stop.is_set():
            for msg in next_batch(consumer, 100, poll):
                err = msg.error()
                if err is not None:
                    # A broker outage is waited out (librdkafka reconnects); callers
                    # bound the wait themselves. Only a fatal error ends the follow.
                    if err.fatal():
                        raise BrokerError(f"reading the control topics: {err.str()}")
                    continue
                ev = accepted(msg)
                if ev is None or ev.at_ms < since_ms or trusted(
                        known, ev, msg.value(), f"{msg.topic()} offset {msg.offset()}"
                )[0] is False:
                    continue
                known = fold((ev,), known)
                yield ev
    finally:
        consumer.close()


def wait_event(settings: KafkaSettings, since_ms: int,
               match: Callable[[Event], bool], timeout: float, what: str,
               fail: Callable[[Event], str | None] | None = None) -> Event:
    """The first event since ``since_ms`` for which ``match`` holds; raises Timeout after
    ``timeout`` seconds, or X2XError with the reason ``fail`` returns for an event."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        for ev in follow(settings, since_ms, stop):
            if match(ev):
                return ev
            reason = fail(ev) if fail else None
            if reason:
                raise X2XError(reason)
    finally:
        timer.cancel()
    raise Timeout(f"no answer after {timeout:.0f} s: {what}")
