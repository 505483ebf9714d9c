"""Seeding a target from the history base: a sparse copy of the base volume and its
checkpoint, after which the target replays the journal from the base's position.

A replica built after most history left the journal, or a reader that fell behind the
base (BehindBase), comes back this way. Any volume x2x applies with a checkpoint can be
the origin (the base, or a stopped target when the base itself is lost).
"""
from __future__ import annotations

import os
import socket

from confluent_kafka import Producer

from consumers.checkpoint import Checkpoint, CheckpointStore
from infra import images
from infra.heartbeat import HeartbeatPublisher, read_beats
from infra.kafka import KafkaSettings
from infra.volumes import copy_sparse
from journal.clock import now_ms
from journal.errors import BadInput, BrokerError, X2XError
from journal.pairs import PairSpec
from journal.sequence import Position
from journal.status import newest

#: Seconds to wait for the base's lock: the base frees it between its cycles.
LOCK_WAIT = 60.0


class NoBase(X2XError):
    """No history base (or no checkpoint of it) to seed from."""


def find_base(settings: KafkaSettings, pair: str) -> str:
    """The volume of the pair's history base on this host, from its newest heartbeat."""
    b = newest([b for b in read_beats(settings) if b.host == socket.gethostname()],
               pair, "base")
    if b is None:
        raise NoBase(f"pair {pair}: no history base runs on this host; give its volume with "
                     f"--base PATH, or start one with 'x2x base {pair} --volume PATH'")
    return b.instance


def register(settings: KafkaSettings, pair: str, target: str, pos: Position | None,
             state: str = "seeded") -> None:
    """Say on x2x.status, acknowledged, that ``target`` needs the journal from ``pos``
    (done before the base is unlocked, so its next deletion already respects it), or
    with ``pos=None`` that it needs nothing any more (released)."""
    producer = Producer(settings.side_producer())
    p = pos or Position()
    HeartbeatPublisher(producer, pair, "applier", target).beat(
        state, p.epoch, p.seq, p.epoch_bytes, p.captured_at_ms,
        detail={"needs": "" if pos is None else str(max(pos.offset, 0))}, force=True)
    if producer.flush(15):
        raise BrokerError(f"could not tell {settings.bootstrap} what {target} needs of "
                          f"pair {pair}'s journal; try again")


def seed(spec: PairSpec, origin: str, target: str, settings: KafkaSettings,
         lock_wait: float = LOCK_WAIT, reader: bool = True) -> Checkpoint:
    """Make ``target`` a copy of ``origin`` at origin's checkpoint, with that checkpoint.

    Both volumes are locked (origin's applier is between cycles, target's is not
    running), so the copy is of a target exactly at or ahead of its checkpoint, which
    replay from the checkpoint makes exact (DESIGN rule 4). ``reader``: register
    ``target`` as a reader of the journal (not when it becomes the base itself)."""
    real = os.path.realpath
    if real(target) in (real(origin), real(spec.source)):
        raise BadInput(f"{target} is the pair's source or the seed's origin; seed another "
                       f"volume")
    loc = images.locate(target)     # a raw file is made sparse, an image in its format
    if loc.kind != "nbd":
        images.create(loc, spec.volume_size)
    if images.size(loc) < spec.volume_size:
        raise BadInput(f"{target} is smaller than the pair's volume ({spec.volume_size} "
                       f"bytes); grow it or choose another")
    origin_store = CheckpointStore(spec.name, origin)
    store = CheckpointStore(spec.name, target)
    with store.lock(), origin_store.lock(wait=lock_wait):
        cp = origin_store.load()
        if cp is None:
            raise NoBase(f"pair {spec.name}: {origin} has no checkpoint yet (the base applies "
                         f"only what left the window, and nothing has); while the journal "
                         f"still holds its start, build by replaying: 'x2x replica add "
                         f"{spec.name} --target {target}'")
        # Registered first: if the copy fails the registration only holds the journal
        # at the base's position until this reader is seeded again or its TTL passes.
        if reader:
            register(settings, spec.name, target, cp.position)
        copy_sparse(origin, target, spec.volume_size)
        new = Checkpoint(spec.name, target, cp.position, cp.entry_digest, now_ms())
        store.save(new)
    return new
