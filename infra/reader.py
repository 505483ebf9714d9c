"""Reading small topics (control, status) up to their end.

The end is taken from the fetch's partition-EOF event rather than ListOffsets, which
some Kafka-compatible brokers answer wrongly.
"""
from __future__ import annotations

import time
from typing import Iterator

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from infra.kafka import KafkaSettings
from journal.errors import BrokerError


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
    consumer = Consumer(settings.consumer())
    try:
        consumer.assign([TopicPartition(t, 0, o) for t, o in starts.items()])
        pending = set(starts)
        deadline = time.monotonic() + timeout
        while pending:
            batch = consumer.consume(1000, 0.05)
            for msg in batch:
                err = msg.error()
                if err is None:
                    yield msg.topic(), msg
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.topic())
                elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise BrokerError(f"reading {msg.topic() or ', '.join(pending)} from "
                                      f"{settings.bootstrap}: {err.str()}")
            if batch:
                deadline = time.monotonic() + timeout
            elif time.monotonic() > deadline:
                raise BrokerError(f"no answer from Kafka at {settings.bootstrap} while reading "
                                  f"{', '.join(sorted(pending))} for {timeout:.0f} s; is the "
                                  f"broker up?")
    finally:
        consumer.close()
