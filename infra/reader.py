"""Reading a whole small topic (control, status) up to its end.

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
    consumer = Consumer(settings.consumer())
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout
        while True:
            batch = consumer.consume(1000, 0.05)
            for msg in batch:
                err = msg.error()
                if err is None:
                    yield msg
                elif err.code() == KafkaError._PARTITION_EOF:
                    return
                elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise BrokerError(f"reading {topic} from {settings.bootstrap}: {err.str()}")
            if batch:
                deadline = time.monotonic() + timeout
            elif time.monotonic() > deadline:
                raise BrokerError(f"no answer from Kafka at {settings.bootstrap} while reading "
                                  f"{topic} for {timeout:.0f} s; is the broker up?")
    finally:
        consumer.close()
