"""What Kafka holds of a journal: its start and end offsets, single records, deleting
records below an offset (DeleteRecords), and the segment size that lets the disk follow.

x2x alone decides what may be deleted (journal/history.py); this module only does it.
"""
from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (AlterConfigOpType, ConfigEntry, ConfigResource,
                                   ResourceType)

from infra.kafka import KafkaSettings
from infra.reader import offsets_of
from infra.topics import journal_topic
from journal.errors import BrokerError, X2XError
from journal.history import Mark
from schemas import codec


def watermarks(settings: KafkaSettings, pair: str, timeout: float = 10.0) -> tuple[int, int]:
    """(first offset held, next offset to be written) of the pair's journal."""
    consumer = Consumer(settings.consumer())
    try:
        return offsets_of(consumer, journal_topic(pair), timeout)
    finally:
        consumer.close()


def mark_at(settings: KafkaSettings, pair: str, offset: int,
            timeout: float = 10.0) -> Mark | None:
    """The journal record at ``offset`` (or the first one after it) as a Mark; None when
    the journal holds nothing from there on. Entries are read, not opened: capture time,
    epoch and byte counts are outside the encryption (schemas/cipher.py)."""
    consumer = Consumer(settings.consumer())
    try:
        consumer.assign([TopicPartition(journal_topic(pair), 0, max(offset, 0))])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(1, 0.2):
                err = msg.error()
                if err is None:
                    try:
                        e = codec.decode_entry(msg.value())
                    except X2XError:
                        return None
                    return Mark(msg.offset(), e.epoch, e.epoch_bytes, e.payload_bytes,
                                e.captured_at_ms)
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    return None
        return None
    finally:
        consumer.close()


def delete_below(settings: KafkaSettings, pair: str, offset: int,
                 timeout: float = 30.0) -> int:
    """Delete every record of the journal below ``offset``; the journal's new start."""
    admin = settings.check_reachable()
    tp = TopicPartition(journal_topic(pair), 0, offset)
    try:
        done = admin.delete_records([tp], request_timeout=timeout,
                                    operation_timeout=timeout)[tp].result()
    except KafkaException as e:
        raise BrokerError(f"DeleteRecords on {journal_topic(pair)} below offset {offset} "
                          f"failed: {e}; this broker may not support it (Tansu does not)"
                          ) from None
    return getattr(done, "low_watermark", offset)


def set_segment_bytes(settings: KafkaSettings, pair: str, size: int,
                      timeout: float = 15.0) -> None:
    """Kafka frees disk by whole segments only: a windowed journal gets segments small
    next to its window, or deleted records would stay on disk for a 1 GiB segment."""
    res = ConfigResource(ResourceType.TOPIC, journal_topic(pair), incremental_configs=[
        ConfigEntry("segment.bytes", str(size),
                    incremental_operation=AlterConfigOpType.SET)])
    admin = settings.check_reachable()
    try:
        for f in admin.incremental_alter_configs([res], request_timeout=timeout).values():
            f.result()
    except KafkaException as e:
        raise BrokerError(f"cannot set segment.bytes of {journal_topic(pair)}: {e}") from None
