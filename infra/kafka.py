"""The one place Kafka client settings are built.

librdkafka properties from ``X2X_KAFKA_CONFIG`` (a ``key=value`` file, for TLS/SASL) pass
through unchanged; x2x adds only what its correctness depends on.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from infra.paths import x2x_home
from infra.files import read_json
from journal.errors import BadInput, BrokerError

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
#: Partitions are assigned by hand; the group id only satisfies librdkafka (which still
#: looks up its coordinator, so ACLs must let every role read this group).
CONSUMER_GROUP = "x2x"
#: librdkafka chatter (connection refused, retries) goes here; shown with --verbose.
rdkafka_log = logging.getLogger("x2x.librdkafka")
_SECRET_WORDS = ("password", "secret", "key", "token")
#: Kafka's own compression of journal records (librdkafka ``compression.type`` and
#: ``compression.level``), ``CODEC[:LEVEL]``. zstd level 1, from bench/compression.py on
#: an ext4 image of text, binaries and a database (bench/results/compression.json,
#: docs/operations.md): 26 % fewer bytes on the wire than lz4 (ratio 0.33 against 0.45)
#: for 0.8 CPU s more per GiB (2.25 against 1.43 s/GiB of compression: ~480 MB/s on one
#: core); higher levels cost 1.6-6x its CPU for 3-10 % fewer bytes. On a thin link the
#: bytes are the time; on a fast one a core still compresses faster than 3 Gbit/s.
DEFAULT_COMPRESSION = "zstd:1"
_CODECS = {"none": None, "gzip": range(0, 10), "snappy": None, "lz4": range(0, 13),
           "zstd": range(-131072, 23)}


def load_properties(path: str) -> dict[str, str]:
    """Parse a librdkafka/Java-style properties file (``key=value``, ``#`` comments)."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise BadInput(f"cannot read Kafka properties file {path}: {e.strerror}") from None
    props: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise BadInput(f"{path} line {n}: expected key=value, got {line!r}")
        props[key.strip()] = value.strip()
    return props


def redact(props: dict[str, Any]) -> dict[str, Any]:
    """Settings safe to print or log: secrets replaced by ``***``."""
    return {k: ("***" if any(w in k for w in _SECRET_WORDS) else v) for k, v in props.items()}


#: How long a follower's fetch (a service reading a topic as it grows) waits at the broker
#: for a new record. Apache Kafka answers the moment one arrives, so the wait costs no
#: latency, and a short one made every idle follower 20 empty fetches a second: an idle
#: pair (capturer and applier) cost the broker 11 % of a core at 50 ms, 8 % at 500
#: (measured 8 s after the start; 5.6 % once the JVM is warm, the broker alone 3.6 %).
FOLLOW_WAIT_MS = 500
#: Tansu answers a fetch only when its wait ends (a record 78 ms late at 500 ms).
TANSU_FOLLOW_WAIT_MS = 50


@dataclass(frozen=True)
class KafkaSettings:
    """Where the cluster is and how to talk to it."""

    bootstrap: str
    extra: dict[str, str] = field(default_factory=dict)
    compression: str = DEFAULT_COMPRESSION
    follow_wait_ms: int = FOLLOW_WAIT_MS

    def __repr__(self) -> str:
        # Settings end up in tracebacks, debuggers and log lines: never with a password.
        return (f"KafkaSettings(bootstrap={self.bootstrap!r}, extra={redact(self.extra)!r}, "
                f"compression={self.compression!r})")

    @classmethod
    def resolve(cls, bootstrap: str | None = None, config_file: str | None = None,
                compression: str | None = None) -> "KafkaSettings":
        """``--bootstrap`` > ``X2X_BOOTSTRAP`` > the embedded broker > 127.0.0.1:9092."""
        embedded = read_json(x2x_home() / "broker" / "broker.json")
        bootstrap = (bootstrap or os.environ.get("X2X_BOOTSTRAP")
                     or (embedded["bootstrap"] if embedded else DEFAULT_BOOTSTRAP))
        config_file = config_file or os.environ.get("X2X_KAFKA_CONFIG")
        extra = load_properties(config_file) if config_file else {}
        compression = compression or os.environ.get("X2X_COMPRESSION") or DEFAULT_COMPRESSION
        compression_settings(compression)          # refused here, not by librdkafka later
        return cls(bootstrap, extra, compression, _follow_wait_ms(bootstrap, embedded))

    def _common(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "logger": rdkafka_log,
                # Once the bootstrap address has answered, librdkafka drops that handle
                # for the broker's own (node id) and holds the new connection back for
                # half the reconnect backoff: the default 100 ms made every new client's
                # first request take 55 ms on a local broker, 15 ms with this. Backoff
                # still doubles per failed attempt up to reconnect.backoff.max.ms.
                "reconnect.backoff.ms": 10,
                **self.extra}

    def producer(self, **overrides: Any) -> dict[str, Any]:
        return {
            **self._common(),
            # Ordered, exactly-once-per-session appends are what makes the journal a journal.
            "enable.idempotence": True,
            "acks": "all",
            **compression_settings(self.compression),
            "linger.ms": 5,
            # librdkafka's idempotent producer busy-polls its broker socket while the
            # default five requests are in flight: 3-4 CPU seconds per GiB journaled
            # on this project's machines (bench/nbd_capture.py), for no more throughput
            # than three give. (Up to five keep the order; the cap is not ours to raise.)
            "max.in.flight.requests.per.connection": 3,
            "message.max.bytes": 4 * 1024 * 1024,
            "queue.buffering.max.kbytes": 256 * 1024,
            # A record the broker has not acknowledged after 30 s fails its delivery report
            # (librdkafka's default is 5 minutes): the NBD capturer then goes degraded and
            # keeps only its write-intent bitmap instead of queueing without end.
            "message.timeout.ms": 30_000,
            # Topics are created by x2x only (one partition, retention): a restarted
            # broker must not get them back auto-created with its defaults by a retry.
            "allow.auto.create.topics": False,
            **overrides,
        }

    def side_producer(self, **overrides: Any) -> dict[str, Any]:
        """For control events and heartbeats: acknowledged, but without the idempotent
        producer's start-up round trip, which only the journal's ordering needs."""
        return self.producer(**{"enable.idempotence": False, "linger.ms": 0, **overrides})

    def consumer(self, **overrides: Any) -> dict[str, Any]:
        return {
            **self._common(),
            "group.id": CONSUMER_GROUP,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            # Short fetch waits: services poll continuously anyway, and CLI reads of small
            # topics end at partition EOF, which a long wait only delays.
            "fetch.wait.max.ms": 50,
            # Prefetch bounded so an applier's memory does not grow with the journal.
            "fetch.max.bytes": 16 * 1024 * 1024,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "queued.max.messages.kbytes": 32 * 1024,
            # Once that prefetch is full librdkafka postpones the next fetch by this much
            # (default 1 s): a reader that drains the queue faster then idles up to a
            # second per fill. Measured: a journal replay spent 80 % of its time waiting
            # in consume(), and a bare consume ran at half speed.
            "fetch.queue.backoff.ms": 10,
            **overrides,
        }

    def follower(self, **overrides: Any) -> dict[str, Any]:
        """For a service that follows a topic as it grows and never needs its end soon
        (partition EOF comes only when a fetch returns empty, after the wait)."""
        return self.consumer(**{"fetch.wait.max.ms": self.follow_wait_ms, **overrides})

    def admin(self) -> dict[str, Any]:
        return self._common()

    def check_reachable(self, timeout: float = 10.0) -> AdminClient:
        """Return an admin client, or fail fast with the address instead of hanging."""
        admin = AdminClient(self.admin())
        try:
            admin.list_topics(timeout=timeout)
        except KafkaException as e:
            raise BrokerError(
                f"cannot reach Kafka at {self.bootstrap} within {timeout:.0f} s "
                f"({e.args[0].str() if e.args else e}); start the embedded broker with "
                f"'x2x broker up' or point --bootstrap / X2X_BOOTSTRAP at your cluster") from None
        return admin


def compression_settings(text: str) -> dict[str, Any]:
    """``zstd:1`` -> ``{"compression.type": "zstd", "compression.level": 1}``."""
    codec, sep, level = text.strip().lower().partition(":")
    if codec not in _CODECS:
        raise BadInput(f"compression {text!r}: unknown codec {codec!r}; choose from "
                       f"{', '.join(_CODECS)}, optionally with :LEVEL (e.g. zstd:1)")
    out: dict[str, Any] = {"compression.type": codec}
    if sep:
        levels = _CODECS[codec]
        if levels is None or not level.lstrip("-").isdigit() or int(level) not in levels:
            raise BadInput(f"compression {text!r}: "
                           + (f"{codec} has no levels" if levels is None else
                              f"level {level!r} is not in {levels.start}..{levels.stop - 1}"))
        out["compression.level"] = int(level)
    return out


def _follow_wait_ms(bootstrap: str, embedded: dict[str, Any] | None) -> int:
    """Tansu's wait when ``bootstrap`` is the ``embedded`` broker's and that is Tansu,
    else Kafka's."""
    # State files written before engines existed describe Tansu (infra/broker.BrokerState).
    if (embedded and embedded.get("bootstrap") == bootstrap
            and embedded.get("engine", "tansu") == "tansu"):
        return TANSU_FOLLOW_WAIT_MS
    return FOLLOW_WAIT_MS
