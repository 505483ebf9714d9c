"""The one place topic names and topic settings are decided."""
from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from journal.errors import BrokerError
from journal.roles import Role

#: The operators' control topic; capturers and appliers each publish to their own
#: (``x2x.control.capturer``, ``x2x.control.applier``), so ACLs can keep a role to the
#: events it may publish (journal/roles.py).
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
#: Heartbeats are keyed by pair, role and instance, and only the newest of each matters:
#: compaction keeps the topic at about one record per service however long they run
#: (segments roll every 10 s so the cleaner can reach them), and a service gone for a
#: day disappears with its last beat.
STATUS_CONFIG = {"cleanup.policy": "compact,delete", "retention.ms": str(24 * 3600 * 1000),
                 "segment.ms": "10000", "min.cleanable.dirty.ratio": "0.01",
                 "delete.retention.ms": "60000"}


def journal_topic(pair: str) -> str:
    return JOURNAL_PREFIX + pair


def control_topic(role: Role) -> str:
    """Where ``role`` publishes its control events."""
    return CONTROL_TOPIC if role is Role.OPERATOR else f"{CONTROL_TOPIC}.{role.value}"


#: Every control topic, in the order readers merge them.
CONTROL_TOPICS = tuple(control_topic(r) for r in Role)


def existing(admin: AdminClient, names: tuple[str, ...] | list[str],
             timeout: float = 15.0) -> set[str]:
    """Which of ``names`` exist (and this client may see)."""
    try:
        topics = admin.list_topics(timeout=timeout).topics
    except KafkaException as e:
        raise BrokerError(f"cannot list topics: {e}") from None
    return {n for n in names if n in topics and topics[n].error is None}


def ensure_topic(admin: AdminClient, name: str, config: dict[str, str],
                 timeout: float = 15.0) -> bool:
    """Create ``name`` with one partition unless it exists; True if it was created.

    Idempotent, and always done before the first produce: a produce that relies on
    auto-creation can lose records on some brokers. An existing topic is not created
    again, so a principal without CREATE (a capturer under ACLs) gets through.
    """
    if existing(admin, [name], timeout):
        return False
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
        if e.args and e.args[0].code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                           KafkaError.CLUSTER_AUTHORIZATION_FAILED):
            raise BrokerError(f"topic {name} does not exist and this principal may not "
                              f"create it: an operator creates topics ('x2x pair create')"
                              ) from None
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
    """The control and status topics, created where missing."""
    have = existing(admin, [*CONTROL_TOPICS, STATUS_TOPIC])
    for name in CONTROL_TOPICS:
        if name not in have:
            ensure_topic(admin, name, CONTROL_CONFIG)
    if STATUS_TOPIC not in have:
        ensure_topic(admin, STATUS_TOPIC, STATUS_CONFIG)
