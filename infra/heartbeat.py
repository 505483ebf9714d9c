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

from confluent_kafka import KafkaException, Producer

from infra.files import read_json, write_json
from infra.kafka import KafkaSettings
from infra.paths import pair_dir, x2x_home
from infra.reader import read_to_end
from infra.topics import STATUS_TOPIC
from infra import keys
from journal.pairs import PairSpec
from journal.status import Beat
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
    beats = []
    for m in read_to_end(settings, STATUS_TOPIC):
        where = f"{STATUS_TOPIC} offset {m.offset()}"
        try:
            record = codec.decode(m.value(), codec.HEARTBEAT)
            record.pop("mac", None)
            beat = Beat(**record)
        except X2XError as e:
            # info, not warning: the record stays in the topic and would be reported again
            # on every read; operators see it with --verbose.
            log.info("skipping %s: %s", where, e)
            continue
        spec = (specs or {}).get(beat.pair)
        if spec is None or not spec.key_id or _signed(spec, m.value(), strict, where):
            beats.append(beat)
    return beats


def _signed(spec: PairSpec, data: bytes, strict: bool, where: str) -> bool:
    key = keys.lookup(spec)
    if key is None:
        return not strict
    if codec.verified_mac(codec.HEARTBEAT, data, key.status_mac) is not None:
        return True
    log.info("skipping %s: a beat of pair %s not signed with its key", where, spec.name)
    return False
