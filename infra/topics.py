"""The one place topic names and topic settings are decided."""
from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from journal.errors import BrokerError

CONTROL_TOPIC = "x2x.control"
STATUS_TOPIC = "x2x.status"
JOURNAL_PREFIX = "x2x.journal."

#: Journal entries reach 4 MiB (infra/kafka.py); Apache Kafka's default cap per record
#: batch is 1 MiB, so every journal topic says what it needs, on any cluster.
MAX_MESSAGE_BYTES = str(8 * 1024 * 1024)
#: The journal is the system of record: never expire it by time or size.
JOURNAL_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete",
                  "max.message.bytes": MAX_MESSAGE_BYTES}
CONTROL_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1"}
STATUS_CONFIG = {"retention.ms": str(24 * 3600 * 1000)}


def journal_topic(pair: str) -> str:
    return JOURNAL_PREFIX + pair


def ensure_topic(admin: AdminClient, name: str, config: dict[str, str],
                 timeout: float = 15.0) -> bool:
    """Create ``name`` with one partition unless it exists; True if it was created.

    Idempotent, and always done before the first produce: a produce that relies on
    auto-creation can lose records on some brokers.
    """
    # Replication factor -1: the cluster's default (3 on a production cluster), not a
    # hard-coded 1 that would pin a journal to a single broker.
    futures = admin.create_topics([NewTopic(name, 1, -1, config=config)],
                                  request_timeout=timeout)
    try:
        futures[name].result()
        return True
    except KafkaException as e:
        if e.args and e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise BrokerError(f"cannot create topic {name}: {e}") from None


def delete_topic(admin: AdminClient, name: str, timeout: float = 15.0) -> None:
    futures = admin.delete_topics([name], request_timeout=timeout)
    try:
        futures[name].result()
    except KafkaException as e:
        if e.args and e.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return
        raise BrokerError(f"cannot delete topic {name}: {e}") from None


def ensure_base_topics(admin: AdminClient) -> None:
    ensure_topic(admin, CONTROL_TOPIC, CONTROL_CONFIG)
    ensure_topic(admin, STATUS_TOPIC, STATUS_CONFIG)
