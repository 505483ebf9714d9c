"""Reading small topics (control, status) up to their end.

The end is taken from the fetch's partition-EOF event rather than ListOffsets, which
some Kafka-compatible brokers answer wrongly; a follower that waits long at the end of
a busy topic never sees that event and passes the end it asked (offsets_of,
read_up_to_end).
"""
from __future__ import annotations

import time
from typing import Iterator, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from infra.kafka import KafkaSettings
from journal.errors import BrokerError


def next_batch(consumer: Consumer, most: int, wait: float) -> list[Message]:
    """Up to ``most`` records (and events) already fetched, or, when none is, the first to
    come within ``wait`` seconds. ``consume(most, wait)`` alone returns early only once
    it has ``most``: with fewer left it waits out all of ``wait``, so every control read
    ended 50 ms late, and an applier following a live journal took its records in
    batches 100 ms apart."""
    batch = consumer.consume(most, 0)
    if batch:
        return batch
    msg = consumer.poll(wait)
    return [msg] if msg is not None else []


def read_to_end(settings: KafkaSettings, topic: str, timeout: float = 15.0) -> Iterator[Message]:
    """Yield every record of partition 0 of ``topic``, from the start to its end."""
    for _topic, msg in read_many(settings, {topic: 0}, timeout):
        yield msg


def read_many(settings: KafkaSettings, starts: dict[str, int],
              timeout: float = 15.0) -> Iterator[tuple[str, Message]]:
    """Yield ``(topic, record)`` for partition 0 of every topic in ``starts``, from the
    offset given to its end; one consumer and one fetch loop for all of them."""
    if not starts:
        return
    # The end is known only once a fetch comes back empty, which the broker holds for
    # fetch.wait.max.ms: 10 ms instead of 50 makes every read of the control topics (an
    # applier's start, each CLI command) 50 ms shorter.
    consumer = Consumer(settings.consumer(**{"fetch.wait.max.ms": 10}))
    try:
        consumer.assign([TopicPartition(t, 0, o) for t, o in starts.items()])
        yield from read_up_to_end(consumer, set(starts), settings.bootstrap, timeout)
    finally:
        consumer.close()


def read_up_to_end(consumer: Consumer, pending: set[str], bootstrap: str, timeout: float,
                   patient: bool = False, until: Mapping[str, int] | None = None
                   ) -> Iterator[tuple[str, Message]]:
    """Yield ``(topic, record)`` from ``consumer`` (which stays the caller's) until every
    topic in ``pending`` has reported its end, then whatever is already fetched; topics
    leave ``pending`` as they report, so a consumer that keeps following a topic passes
    the same set again and later calls take only what has arrived. A topic in ``until``
    also leaves once read up to that offset, its end as the caller asked it of the
    broker: a fetch at the end of a topic written more often than the fetch waits is
    answered by the next record, so that topic never reports its end. BrokerError after
    ``timeout`` seconds without an answer, and at once on a broker error unless
    ``patient`` (a follower waits out an outage; only a fatal error ends it)."""
    until = until or {}
    deadline = time.monotonic() + timeout
    while True:
        batch = next_batch(consumer, 1000, 0.05 if pending else 0)
        answered = False          # a record or an end: errors the broker repeats are not
        for msg in batch:
            err = msg.error()
            if err is None:
                answered = True
                yield msg.topic(), msg
                if msg.offset() + 1 >= until.get(msg.topic(), 1 << 63):
                    pending.discard(msg.topic())
            elif err.code() == KafkaError._PARTITION_EOF:
                answered = True
                pending.discard(msg.topic())
            elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART and (
                    err.fatal() or not patient):
                raise BrokerError(f"reading {msg.topic() or ', '.join(pending)} from "
                                  f"{bootstrap}: {err.str()}")
        if answered:
            deadline = time.monotonic() + timeout
        elif not pending:
            return
        elif time.monotonic() > deadline:
            raise BrokerError(f"no answer from Kafka at {bootstrap} while reading "
                              f"{', '.join(sorted(pending))} for {timeout:.0f} s; is the "
                              f"broker up?")


def offsets_of(consumer: Consumer, topic: str, timeout: float = 10.0) -> tuple[int, int]:
    """(first offset held, next offset to be written) of partition 0 of ``topic``. A new
    consumer may not know the partition yet ("unknown partition"): asked again until
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, 0),
                                                  timeout=max(1.0, timeout / 5), cached=False)
        except KafkaException as e:
            if time.monotonic() > deadline:
                why = e.args[0].str() if e.args and isinstance(e.args[0], KafkaError) else e
                raise BrokerError(f"no answer from Kafka about the offsets of {topic} within "
                                  f"{timeout:.0f} s ({why}); is the broker up?") from None
            time.sleep(0.2)


def check_record(consumer: Consumer, topic: str, offset: int, digest: bytes,
                 timeout: float) -> str | None:
    """Why the record at ``offset`` of ``topic`` is not the journal entry with ``digest``
    that x2x last saw there, or None if it is. ``consumer`` is assigned at ``offset``
    and, on None, positioned just after it. A broker that lost its data, a recreated
    topic, a shorter log or someone else's record there all give a reason."""
    from schemas import codec
    from journal.errors import X2XError
    deadline = time.monotonic() + timeout
    transient = ""
    while time.monotonic() < deadline:
        for msg in consumer.consume(1, 0.2):
            err = msg.error()
            if err is not None:
                transient = f" (the broker last answered: {err.str()})"
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    return "the topic does not exist"
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError.OFFSET_OUT_OF_RANGE):
                    return "the journal ends before it"
                if err.fatal():
                    raise BrokerError(f"reading {topic}: {err.str()}")
                continue                    # transient: librdkafka retries
            if msg.offset() != offset:
                return "the journal ends before it"
            try:
                found = codec.decode_entry(msg.value()).digest
            except X2XError:
                return "a record that is not an x2x journal entry stands at that offset"
            return None if found == digest else "a different record stands at that offset"
    return f"no record at that offset within {timeout:.0f} s{transient}"
