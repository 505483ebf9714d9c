"""Heartbeats on ``x2x.status``: published by capturers and appliers, read by ``x2x status``.

A keyed pair's beats are signed with its key. Readers that act on a beat (a forced
failover's goal, an applier's catch-up goal) take only beats that verify; ``x2x status``
drops the ones that fail and shows the ones it cannot check (no key on this host).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

from confluent_kafka import (Consumer, KafkaException, Message, Producer,
                             TopicPartition)

from infra.files import read_json, write_json
from infra.kafka import KafkaSettings
from infra.paths import pair_dir, x2x_home
from infra.reader import offsets_of, read_to_end, read_up_to_end
from infra.topics import STATUS_TOPIC
from infra import keys
from journal.pairs import PairSpec
from journal.status import Beat, latest
from journal.errors import X2XError
from journal.clock import now_ms
from schemas import codec
from schemas.cipher import JournalKey

log = logging.getLogger("x2x.status")


class HeartbeatPublisher:
    """Publishes beats through a producer the caller already polls; never blocks."""

    def __init__(self, producer: Producer, pair: str, role: str, instance: str,
                 interval: float = 2.0, key: JournalKey | None = None) -> None:
        self.producer, self.pair, self.role, self.instance = producer, pair, role, instance
        self.interval, self.key = interval, key
        self._last = 0.0
        #: Also keep the newest beat in this file: ``x2x status`` on this host shows it
        #: when the broker cannot be reached, which is when "degraded" matters most.
        self.local_copy: Path | None = None

    def beat(self, state: str, epoch: int, seq: int, epoch_bytes: int, captured_at_ms: int,
             rate_bps: float = 0.0, detail: dict[str, str] | None = None,
             force: bool = False, acked: Callable[[], None] | None = None,
             soon: float | None = None) -> bool:
        """Publish a beat: at most one per ``interval``, or per ``soon`` seconds when the
        caller has news, or now if ``force``; ``acked`` is called from the producer's poll
        once the broker has it. False if it was not time yet."""
        now = time.monotonic()
        if not force and now - self._last < (self.interval if soon is None else soon):
            return False
        self._last = now
        beat = Beat(self.pair, self.role, self.instance, socket.gethostname(), os.getpid(),
                    now_ms(), state, epoch, seq, epoch_bytes, captured_at_ms,
                    rate_bps, detail or {})
        data = codec.encode(codec.HEARTBEAT, asdict(beat))
        if self.key is not None:
            data = codec.sign(codec.HEARTBEAT, data, self.key.status_mac)
        try:
            self.producer.produce(
                STATUS_TOPIC, data, key=beat_key(self.pair, self.role, self.instance),
                on_delivery=acked and (lambda err, _m: err is None and acked()))
        except (BufferError, KafkaException):
            pass  # a status beat is never worth blocking (or failing) the journal for
        if self.local_copy is not None:
            try:
                # Advisory, and written every beat: no fsync to compete with the volumes'.
                write_json(self.local_copy, asdict(beat), durable=False)
            except OSError as e:
                log.debug("cannot keep the local beat in %s: %s", self.local_copy, e)
        return True


def beat_key(pair: str, role: str, instance: str) -> str:
    """One key per service: the status topic's compaction keeps its newest beat."""
    return f"{pair}|{role}|{instance}"


def _beat_file(role: str) -> str:
    return f"{role}.beat.json"


def local_beat_path(pair: str, role: str) -> Path:
    return pair_dir(pair) / _beat_file(role)


def read_local_beats() -> list[Beat]:
    """The newest beat of each capturer that ran on this host (under ``$X2X_HOME``)."""
    beats = []
    for path in sorted((x2x_home() / "pairs").glob(f"*/{_beat_file('capturer')}")):
        raw = read_json(path)
        if not raw:
            continue
        try:
            beats.append(Beat(**raw))
        except TypeError:
            log.info("skipping %s: not a heartbeat of this x2x version", path)
    return beats


def read_beats(settings: KafkaSettings, specs: Mapping[str, PairSpec] | None = None,
               strict: bool = False) -> list[Beat]:
    """Every heartbeat on the status topic; foreign or damaged records are skipped, since
    status is advisory and must never stop replication. With ``specs``, a beat of a keyed
    pair among them is skipped unless signed with the pair's key; one whose key is not on
    this host is kept, unless ``strict`` (for a reader that acts on it)."""
    beats = (_beat_of(m, specs, strict) for m in read_to_end(settings, STATUS_TOPIC))
    return [b for b in beats if b is not None]


class BeatTail:
    """The status topic followed by one consumer, for a reader that asks again and again
    (``x2x status --watch``, the benchmarks' RPO sampling, a watcher): :meth:`latest`
    brings the newest beat of each service up to date with what arrived since it was
    last asked. Reading the topic from its start at every refresh cost a connection, a
    metadata round and fetches each time: sampled twice a second under pgbench, 0.9 s of
    the broker's 3.3 s of CPU and a few % of the database's tps on a shared machine."""

    def __init__(self, settings: KafkaSettings, timeout: float = 15.0) -> None:
        self.settings, self.timeout = settings, timeout
        # A follower's long fetch wait: an idle tail costs the broker two fetches a
        # second, and Kafka answers the moment a beat arrives.
        self._consumer = Consumer(settings.follower())
        self._consumer.assign([TopicPartition(STATUS_TOPIC, 0, 0)])
        # The topic's end is asked on a client that fetches nothing: behind the
        # follower's fetch on its connection, the broker would hold the question for
        # the fetch's whole wait.
        self._asker = Consumer(settings.consumer())
        self._newest: dict[tuple[str, str, str], Beat] = {}
        self._next = 0                        # the offset after the last record read
        self._caught_up = False               # once read up to an end asked

    def latest(self, specs: Mapping[str, PairSpec] | None = None, strict: bool = False,
               fresh: bool = False) -> dict[tuple[str, str, str], Beat]:
        """The newest beat per (pair, role, instance), as ``latest(read_beats(...))``
        gives it; the first call reads up to the topic's end, later ones take only what
        has arrived. ``specs`` and ``strict`` judge the records this call reads (see
        read_beats). With ``fresh`` every call reads up to the end, asked of the broker
        now: a reader that acts on the absence of beats then knows the answer is
        current, or gets BrokerError rather than what the tail held. BrokerError after
        ``timeout`` seconds without an answer."""
        until: dict[str, int] = {}
        if fresh or not self._caught_up:
            end = offsets_of(self._asker, STATUS_TOPIC, self.timeout)[1]
            if end > self._next:
                until[STATUS_TOPIC] = end
        beats = []
        for _topic, msg in read_up_to_end(self._consumer, set(until),
                                          self.settings.bootstrap, self.timeout,
                                          patient=True, until=until):
            self._next = msg.offset() + 1
            beats.append(_beat_of(msg, specs, strict))
        self._caught_up = True
        self._newest = latest([*self._newest.values(), *filter(None, beats)])
        return dict(self._newest)

    def close(self) -> None:
        self._consumer.close()
        self._asker.close()

    def __enter__(self) -> "BeatTail":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _beat_of(msg: Message, specs: Mapping[str, PairSpec] | None,
             strict: bool) -> Beat | None:
    """The beat in ``msg``, or None for a foreign, damaged or (see :func:`read_beats`)
    unsigned record."""
    where = f"{STATUS_TOPIC} offset {msg.offset()}"
    try:
        record = codec.decode(msg.value(), codec.HEARTBEAT)
        record.pop("mac", None)
        beat = Beat(**record)
    except X2XError as e:
        # info, not warning: the record stays in the topic and would be reported again
        # on every read; operators see it with --verbose.
        log.info("skipping %s: %s", where, e)
        return None
    spec = (specs or {}).get(beat.pair)
    if spec is None or not spec.key_id or _signed(spec, msg.value(), strict, where):
        return beat
    return None


def _signed(spec: PairSpec, data: bytes, strict: bool, where: str) -> bool:
    key = keys.lookup(spec)
    if key is None:
        return not strict
    if codec.verified_mac(codec.HEARTBEAT, data, key.status_mac) is not None:
        return True
    log.info("skipping %s: a beat of pair %s not signed with its key", where, spec.name)
    return False
