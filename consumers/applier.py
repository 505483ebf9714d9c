"""The applier: replays a pair's journal onto a target volume, from its checkpoint.

Every entry is checked whole before any of it is applied (decoding, digest, pair, seq,
extents). Entries are staged until their consistency point (FLUSH/SEAL), then applied,
fsynced and checkpointed, so a bad entry or a stop leaves the target at its last
checkpoint as long as the unflushed tail fits the staging budget.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from consumers.checkpoint import Checkpoint, CheckpointStore
from consumers.writer import BackgroundWrites, apply_entries, apply_op
from infra import control, keys, telemetry
from infra.heartbeat import HeartbeatPublisher, read_beats
from infra.kafka import KafkaSettings
from infra.logs import Repeats
from infra.reader import check_record, next_batch, offsets_of
from infra.topics import ensure_base_topics, journal_topic
from infra.volume import digest_of
from infra.volumes import open_volume
from journal.errors import (BehindBase, BrokerError, DigestMismatch, JournalError,
                            JournalLost, PairNotFound, ReplayedEntry, StaleEpoch,
                            VolumeError, VolumeLost, X2XError)
from journal.blocks import HASH_LEN, Extent, coalesce, diff_maps, hash_buffer
from journal.groups import barrier_of
from journal.history import BaseLimit
from journal.ops import Entry, OpKind
from journal.events import HashesCompared, Promoted, ResyncNeeded
from journal.pairs import JOURNAL_LOST, PairSpec, PairState
from journal.sequence import Limit, Position, Verdict, check_extents, classify
from journal.status import APPLIED_BEAT_S, FLUSH_WINDOW_S, RecentMax, newest
from journal.roles import Role
from journal.clock import now_ms
from schemas.cipher import JournalKey, open_record

log = logging.getLogger("x2x.applier")
STAGE_LIMIT = 64 << 20
CONSUME_BATCH = 32
#: Seconds between two checkpoints while consistency points stream in
#: (``X2X_CHECKPOINT_INTERVAL``; 0: one at every record that ends at a point). A database
#: commits hundreds of times a second: a checkpoint at each one's record cost the target
#: host a volume fsync, a file fsync, a rename and a directory fsync at each, I/O that
#: shares its disks with everything else there. Points within the interval stay staged
#: and are applied with the next; a point after a quiet spell is checkpointed at once.
CHECKPOINT_INTERVAL = float(os.environ.get("X2X_CHECKPOINT_INTERVAL", "0.1"))
VERIFY_TIMEOUT = 15.0
#: A checkpoint whose fsync of the target takes this long is logged (once per
#: FLUSH_WINDOW_S): the RPO includes the time, and the cause is the target's disk.
SLOW_FLUSH_S = 1.0
#: At most this many characters of extents (``offset+length,``) in a hashes-compared
#: event, so one event stays far below the broker's record size limit.
EXTENTS_CHARS = 200_000


def _within(extents: list[Extent], chars: int) -> list[Extent]:
    """The first extents whose ``offset+length`` list fits in ``chars`` characters."""
    used = 0
    for i, e in enumerate(extents):
        used += len(f"{e.offset}+{e.length}") + (1 if i else 0)
        if used > chars:
            return extents[:i]
    return extents
#: How long the applier keeps trying to reach a target served over NBD that went away.
TARGET_RETRY_S = float(os.environ.get("X2X_TARGET_RETRY_S", "300"))


@dataclass
class ApplyStats:
    stopped_by: str = ""     # signal | caught-up | limit | sealed
    entries: int = 0
    ops: int = 0
    bytes_applied: int = 0
    checkpoints: int = 0
    seconds: float = 0.0
    stale_skipped: int = 0   # late records of abandoned epochs, skipped
    reconnects: int = 0      # times an NBD target came back and applying resumed
    #: Seconds spent writing to the target (in the background or not, fsyncs apart):
    #: next to ``seconds``, how much of a run its target's disk took.
    write_s: float = 0.0
    #: Of ``seconds``, how long reading waited for background writes: a run whose
    #: target's disk is slower than its journal's broker waits here.
    write_wait_s: float = 0.0


@dataclass
class Comparison:
    """What a consistency point's HASHES ops found: target blocks that differ from the
    source at the same journal position."""

    epoch: int
    seq: int                  # the FLUSH ending the HASHES (set at its checkpoint)
    blocks: int = 0           # blocks compared
    differing: list[int] = field(default_factory=list)   # block indexes

    def extents(self, block_size: int, volume_size: int) -> list[Extent]:
        return list(coalesce(sorted(set(self.differing)), block_size, volume_size, 8 << 20))


def _compares(entry: Entry) -> bool:
    """Does ``entry`` carry HASHES ops (the target is compared, not only written)?"""
    return any(op.kind is OpKind.HASHES for op in entry.ops)


@dataclass
class _Staged:
    entry: Entry
    offset: int
    pos: Position          # the position once this entry is applied
    size: int              # the record's bytes (what the staging budget counts)
    compares: bool = False  # carries HASHES ops (looked at once, when staged)


class Applier:
    """Applies one pair's journal to one target volume."""

    def __init__(self, spec: PairSpec, target: str, settings: KafkaSettings,
                 key: JournalKey | None = None, store: CheckpointStore | None = None,
                 stage_limit: int = STAGE_LIMIT, limit: Limit | BaseLimit | None = None,
                 on_checkpoint: Callable[[Position], None] | None = None,
                 publish_status: bool = True, start: Position | None = None,
                 until: tuple[int, int] | None = None, role: Role = Role.APPLIER,
                 checkpoint_interval: float = CHECKPOINT_INTERVAL) -> None:
        self.spec, self.target, self.settings = spec, target, settings
        # Bound to the pair's incarnation, and known to the control plane, which signs
        # this applier's events and beats with it.
        self.key = keys.remember(key).bound(spec.incarnation) if key else None
        #: Whose control topic this applier's events go to: an applier service's, or the
        #: operator's when a command (failover, failback) drains the target in-process.
        self.role = role
        self.topic = journal_topic(spec.name)
        self.store = store or CheckpointStore(spec.name, target)
        self.stage_limit = stage_limit
        self.checkpoint_interval = checkpoint_interval
        self.limit = limit
        self.on_checkpoint = on_checkpoint
        # A scratch replay (journal check) stays invisible: no heartbeats, no pair marks.
        self.publish_status = publish_status
        self.sealed: Entry | None = None
        # Without a checkpoint, start right after ``start`` (failback: at the HASHES
        # entry of the reverse epoch) instead of at the journal's first record.
        self.start = start
        # Stop once a checkpoint at or after (epoch, seq) is written.
        self.until = until
        #: HASHES comparisons, one per consistency point that carried HASHES ops.
        self.comparisons: list[Comparison] = []
        self._cmp: Comparison | None = None
        self.stats = ApplyStats()
        self.checkpointed = Position()
        self._beaten: tuple[int, int] = (-1, -1)      # the position the last beat told
        #: The target's fsync times at checkpoints: the slowest recent one is in every
        #: beat (``flush_s``), a slow one is logged (at most once per window).
        self._flushes = RecentMax(FLUSH_WINDOW_S)
        self._slow_flushes = Repeats(FLUSH_WINDOW_S)
        self._pos = Position()
        self._staged: list[_Staged] = []
        self._staged_bytes = 0
        #: Staged entries up to and including the newest consistency point not yet
        #: checkpointed (0: none), waiting for the checkpoint interval (:meth:`_settle`).
        self._pending = 0
        self._checkpointed_at = 0.0     # monotonic time of the last checkpoint
        #: Set when the staging budget overflowed since the last checkpoint: the target
        #: is ahead of its checkpoint already, so later overflows are written at half the
        #: budget, in the background, while the next half is staged (memory stays within
        #: the budget).
        self._ahead = False
        self._writes = BackgroundWrites()
        #: A member of a consistency group checkpoints only at committed group cuts
        #: (journal/groups.py); set at start from the pair's state. A bounded run (a
        #: failover's drain to a cut, a point in time, a verify) stops at its own point.
        self.grouped = False
        self._committed = 0                 # the newest committed cut seen
        self._cuts: list[tuple[int, int]] = []   # staged barriers: (cut, index in _staged)
        self.cut = 0                        # the group cut the checkpoint is at
        self._last_digest = ""
        self._t0 = time.monotonic()
        #: A point-in-time replica that reached its point needs no more of the journal:
        #: its last beat says so, and the history base stops holding records for it.
        self.released = False
        self._final_state = "stopped"

    @property
    def read_position(self) -> Position:
        """The last entry read and validated, applied or still staged (an unflushed tail)."""
        return self._pos

    # -- the loop --------------------------------------------------------------------
    def run(self, until_caught_up: bool = False, stop: threading.Event | None = None,
            on_progress: Callable[["Applier"], None] | None = None) -> ApplyStats:
        """Apply until stopped, until a SEAL ends the generation, until the point-in-time
        limit, or (with ``until_caught_up``) until the target has every consistency point
        the capturer has journaled."""
        stop = stop or threading.Event()
        # Heartbeats go to x2x.status: it must exist before the first produce, since a
        # broker that auto-creates topics on produce may drop those first records.
        ensure_base_topics(self.settings.check_reachable())
        t0 = self._t0 = time.monotonic()
        with self.store.lock(), open_volume(self.target, writable=True) as vol:
            if vol.size < self.spec.volume_size:
                raise VolumeError(
                    f"target {self.target} is {vol.size} bytes, smaller than the source's "
                    f"{self.spec.volume_size}; grow it (truncate -s {self.spec.volume_size} "
                    f"{self.target}) or choose another target")
            self.vol = vol
            producer = Producer(self.settings.side_producer(**{"linger.ms": 50}))
            beats = HeartbeatPublisher(producer, self.spec.name, "applier", self.target,
                                       key=self.key)
            # Only a run that stops at the journal's end needs to learn of it soon.
            ends = until_caught_up or self.limit is not None
            consumer = Consumer(self.settings.consumer() if ends else self.settings.follower())
            try:
                self._start(consumer)
                while not self.stats.stopped_by:
                    try:
                        stopped_by = self._loop(consumer, beats, producer, stop,
                                                until_caught_up, on_progress)
                        self._settle()      # however it stopped: at the newest point read
                        self._writes.wait()
                        self.stats.stopped_by = stopped_by
                    except VolumeLost as e:
                        if not self._resume(consumer, e, stop):
                            self.stats.stopped_by = "signal"
            except BehindBase:
                # The journal is fine: only this reader fell behind the history base, and
                # it comes back by a re-seed (the error says how), not by a pair resync.
                self._final_state = "behind-base"
                raise
            except JournalError as e:
                self._settle_before(e)
                self._mark_resync(e)
                raise
            finally:
                self._writes.close()
                self.stats.write_wait_s = self._writes.waited_s
                consumer.close()
                self.released = (self.stats.stopped_by == "limit" and os.path.realpath(
                    self.target) != os.path.realpath(self.spec.target))
                self._beat(beats, self._final_state, force=True)
                producer.flush(5)
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _resume(self, consumer: Consumer, error: VolumeLost, stop: threading.Event) -> bool:
        """The target's NBD server went away. What was written after the checkpoint may
        or may not have reached it, so go back to the checkpoint (replay is idempotent,
        DESIGN rule 4), reconnect, and read the journal again from there. False: stopped
        while waiting; raises once the target stayed away for TARGET_RETRY_S."""
        p = self.checkpointed
        log.warning("pair %s: lost the target %s (%s); resuming from its checkpoint epoch "
                    "%d seq %d once it is back", self.spec.name, self.target, error,
                    p.epoch, p.seq)
        self._writes.discard()
        self._staged, self._staged_bytes, self._cmp, self._cuts = [], 0, None, []
        self._pending = 0
        self._pos = p
        self._ahead = False
        deadline, delay = time.monotonic() + TARGET_RETRY_S, 0.1
        while True:
            try:
                self.vol.reconnect()
                break
            except VolumeLost as e:
                if time.monotonic() > deadline:
                    raise VolumeLost(f"pair {self.spec.name}: the target {self.target} stayed "
                                     f"unreachable for {TARGET_RETRY_S:.0f} s ({e}); it holds "
                                     f"at least checkpoint epoch {p.epoch} seq {p.seq}, and "
                                     f"'x2x apply {self.spec.name}' resumes from there") from None
            if stop.wait(delay):
                return False
            delay = min(delay * 2, 2.0)
        consumer.assign([TopicPartition(self.topic, 0, p.offset + 1)])
        self.stats.reconnects += 1
        log.warning("pair %s: the target %s is back; applying again from epoch %d seq %d",
                    self.spec.name, self.target, p.epoch, p.seq)
        return True

    def _loop(self, consumer: Consumer, beats: HeartbeatPublisher, producer: Producer,
              stop: threading.Event, until_caught_up: bool,
              on_progress: Callable[["Applier"], None] | None) -> str:
        at_eof = False
        while not stop.is_set():
            # A small batch bounds memory: records are up to ~1 MiB each.
            batch = next_batch(consumer, CONSUME_BATCH, 0.1)
            for msg in batch:
                err = msg.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    at_eof = True
                    continue
                at_eof = False
                if not self._handle(msg):
                    return "limit"
                if self.sealed is not None:
                    return "sealed"
                if self.until is not None and (self.checkpointed.epoch,
                                               self.checkpointed.seq) >= self.until:
                    return "reached"
            if self.until is not None and (self.checkpointed.epoch,
                                           self.checkpointed.seq) >= self.until:
                return "reached"        # e.g. another applier got there first
            if self._pending and self._due():
                self._settle()
            self._beat(beats, "applying" if batch else "following")
            producer.poll(0)
            if on_progress:
                on_progress(self)
            if at_eof and self.limit is not None:
                return "limit"          # everything the journal holds is within the limit
            if until_caught_up and at_eof:
                goal = self._capture_goal()
                if goal is None or self._reached(goal):
                    return "caught-up"
        return "signal"

    def _handle(self, msg: Message) -> bool:
        """Stage/apply one record; False when it lies beyond the point-in-time limit."""
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise JournalLost(f"the journal topic {self.topic} is gone; the pair was "
                                  f"deleted or the broker lost its data. Recreate the pair and "
                                  f"resync the target")
            raise BrokerError(f"reading {self.topic} from {self.settings.bootstrap}: {err.str()}")
        entry = self._decode(msg)
        try:
            verdict = classify(self._pos, entry)
        except StaleEpoch as e:
            if self._abandoned(entry.epoch):
                log.warning("pair %s: skipped a late record of abandoned epoch %d (seq %d..%d "
                            "at %s offset %d): epoch %d resent its blocks", self.spec.name,
                            entry.epoch, entry.first_seq, entry.last_seq, self.topic,
                            msg.offset(), self._pos.epoch)
                self.stats.stale_skipped += 1
                return True
            raise StaleEpoch(f"{e} [{self.topic} offset {msg.offset()}]") from None
        except JournalError as e:
            raise type(e)(f"{e} [{self.topic} offset {msg.offset()}]") from None
        if verdict is Verdict.DUPLICATE:
            # Records are read once each from the checkpoint on, so an entry already
            # applied can only be a replayed copy: refuse it rather than skip silently.
            raise ReplayedEntry(
                f"pair {self.spec.name}: record at {self.topic} offset {msg.offset()} repeats "
                f"epoch {entry.epoch} seq {entry.first_seq}..{entry.last_seq}, already applied "
                f"up to seq {self._pos.seq}; someone replayed an old entry into the journal. "
                f"Nothing of it was applied")
        if self.limit is not None and self.limit.exceeded_by(entry, msg.offset()):
            return False
        try:
            check_extents(entry, self.vol.size)
        except JournalError as e:
            raise type(e)(f"{e} [{self.topic} offset {msg.offset()}]") from None
        self._pos = self._pos.after(entry, msg.offset())
        self._staged.append(_Staged(entry, msg.offset(), self._pos, len(msg.value()),
                                    _compares(entry)))
        self._staged_bytes += len(msg.value())
        if self.grouped and entry.closes_consistency_point and entry.ops[-1].kind is OpKind.FLUSH:
            self._group_point(entry)
        elif entry.closes_consistency_point:
            self._pending = len(self._staged)
            if (self._due() or self._staged_bytes > self.stage_limit // 2
                    or entry.ops[-1].kind is OpKind.SEAL or self._stops_at_point()
                    or any(s.compares for s in self._staged)):
                # A SEAL, a comparison and a bounded run's points are not held back:
                # each is awaited by someone (a failover, a verify, a drain).
                self._settle()
        elif self._staged_bytes > self._budget():
            self._settle()      # the points staged first, then what follows them
            if self._staged_bytes <= self._budget():
                return True
            if self.grouped and not self._ahead:
                log.warning("pair %s: more than %d MiB between two committed group cuts; "
                            "applied early, so %s is ahead of its group's cut until the next "
                            "one", self.spec.name, self.stage_limit >> 20, self.target)
            # Too large to hold: the target runs ahead of its checkpoint.
            self._apply_staged(background=self._ahead)
            self._ahead = True
        return True

    def _group_point(self, entry: Entry) -> None:
        """A FLUSH in a group member's journal: a checkpoint only at a committed group cut,
        everything up to it applied together (its siblings reach the same cut)."""
        b = barrier_of(entry)
        if b is None:
            return          # a client's FLUSH or a cut of this disk alone: not a group point
        self._cuts.append((b.cut, len(self._staged) - 1))
        self._committed = max(self._committed, b.committed)
        ready = [c for c in self._cuts if c[0] <= self._committed]
        if not ready:
            return
        cut, last = ready[-1]
        at = self._staged[last]
        self._apply_staged(last + 1)
        self._cuts = [(c, i - last - 1) for c, i in self._cuts if c > cut]
        self.cut = cut
        self._checkpoint(at.entry, at.pos)

    def _check_seal(self, entry: Entry) -> None:
        """A SEAL ends a generation: the target must now equal the source, digest for digest."""
        self.vol.fsync()
        seal = entry.ops[-1]
        got = digest_of(self.vol, seal.length)
        if got != seal.data:
            raise DigestMismatch(
                f"pair {self.spec.name}: after draining to SEAL (epoch {entry.epoch} seq "
                f"{entry.last_seq}) the target {self.target} has blake3 {got.hex()[:16]}... but "
                f"the source sealed {seal.data.hex()[:16]}...; the target is NOT promoted. "
                f"Run 'x2x pair verify {self.spec.name} --repair' or resync")
        self.sealed = entry

    def _decode(self, msg: Message) -> Entry:
        return open_record(msg.value(), self.spec.name, self.key,
                           f"{self.topic} offset {msg.offset()}")

    def _promote(self, entry: Entry) -> None:
        """The pair's own target drained to a verified SEAL: it is the source now."""
        if not self.publish_status or (os.path.realpath(self.target)
                                       != os.path.realpath(self.spec.target)):
            return      # a replica or a scratch replay is never promoted
        control.publish(self.settings, Promoted(
            pair=self.spec.name, volume=self.target, epoch=entry.epoch, seq=entry.last_seq,
            forced=False, rpo_s=0.0, rpo_ops=0, promoted_at_ms=now_ms()), self.role)

    def _compare(self, entry: Entry) -> None:
        """Apply ``entry`` op by op, comparing the target with each HASHES op after
        everything before it is applied (so both sides are at the same journal point)."""
        bs = self.spec.block_size
        cmp = self._cmp = self._cmp or Comparison(entry.epoch, 0)
        for op in entry.ops:
            if op.kind is not OpKind.HASHES:
                with self._writing():
                    apply_op(self.vol, op)
                continue
            mine = b"".join(hash_buffer(memoryview(self.vol.pread(op.offset, op.length)), bs))
            cmp.blocks += len(mine) // HASH_LEN
            first = op.offset // bs
            cmp.differing.extend(first + i for i in diff_maps(op.data, mine))

    def _publish_comparison(self, pos: Position) -> None:
        cmp, self._cmp = self._cmp, None
        if cmp is None:
            return
        cmp.seq = pos.seq
        self.comparisons.append(cmp)
        if not self.publish_status:
            return
        extents = cmp.extents(self.spec.block_size, self.vol.size)
        # A huge diff is cut short here; the full list is in the applier's log and a
        # second verify after --repair shows what is left.
        shown = _within(extents, EXTENTS_CHARS)
        try:
            control.publish(self.settings, HashesCompared(
                pair=self.spec.name, target=self.target, epoch=cmp.epoch, seq=cmp.seq,
                blocks=cmp.blocks, differing=len(cmp.differing), extents=tuple(shown),
                truncated=len(shown) < len(extents)), self.role)
        except BrokerError as e:
            log.warning("could not publish the hash comparison of %s: %s", self.target, e)

    def _apply_staged(self, count: int | None = None, background: bool = False) -> None:
        """Apply the first ``count`` staged entries (default: all of them); with
        ``background``, entries without HASHES go to disk while the loop goes on."""
        count = len(self._staged) if count is None else count
        if background and self._cmp is None and not any(
                s.compares for s in self._staged[:count]):
            self._writes.submit(self._write, [s.entry for s in self._staged[:count]])
            self._account(count)
            return
        self._writes.wait()         # in order, after what is in flight
        plain: list[Entry] = []         # entries without HASHES, applied together
        for s in self._staged[:count]:
            if s.compares:
                self._write(plain)
                plain = []
                self._compare(s.entry)
            else:
                plain.append(s.entry)
            if self._cmp is not None and s.entry.closes_consistency_point:
                # Answered at the HASHES' own point, even where a group member's
                # checkpoint comes only at a later cut.
                self._publish_comparison(s.pos)
        self._write(plain)
        self._account(count)

    def _write(self, entries: list[Entry]) -> None:
        """Apply checked entries to the target."""
        with self._writing():
            apply_entries(self.vol, entries)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every write to the target: its time counts in ``write_s``, and a failed
        write names the target and where applying resumes."""
        t0 = time.monotonic()
        try:
            yield
        except OSError as e:
            p = self.checkpointed
            raise VolumeError(
                f"pair {self.spec.name}: writing to the target {self.target} failed: "
                f"{e.strerror or e}. Its checkpoint stays at epoch {p.epoch} seq {p.seq}; "
                f"once the target is fixed (space, device), '{self._rerun()}' applies "
                f"again from there") from e
        finally:
            # One writer at a time (BackgroundWrites is waited for before any other).
            self.stats.write_s += time.monotonic() - t0

    def _rerun(self) -> str:
        """The command that runs this applier again: the pair's own or a replica's."""
        if os.path.realpath(self.target) == os.path.realpath(self.spec.target):
            return f"x2x apply {self.spec.name}"
        return f"x2x replica add {self.spec.name} --target {self.target}"

    def _account(self, count: int) -> None:
        """The first ``count`` staged entries are applied (or being written): count them
        and unstage them."""
        ops = sum(len(s.entry.ops) for s in self._staged[:count])
        nbytes = sum(s.entry.payload_bytes for s in self._staged[:count])
        self.stats.entries += count
        self.stats.ops += ops
        self.stats.bytes_applied += nbytes
        telemetry.metrics().applied(self.spec.name, ops, nbytes, target=self.target)
        self._staged = self._staged[count:]
        self._staged_bytes = sum(s.size for s in self._staged)
        if count and not self._staged:
            self._cuts = []

    def _budget(self) -> int:
        """What may stay staged: the whole budget, half of it once the target is ahead."""
        return self.stage_limit // 2 if self._ahead else self.stage_limit

    def _stops_at_point(self) -> bool:
        """Does this run stop at a point of its own (a drain, a point in time, a verify)?"""
        return self.until is not None or self.limit is not None

    def _due(self) -> bool:
        """Has the checkpoint interval passed since the last checkpoint?"""
        return time.monotonic() - self._checkpointed_at >= self.checkpoint_interval

    def _settle(self) -> None:
        """Apply the staged entries up to the newest consistency point and checkpoint
        there (a SEAL is verified and promotes); what follows it stays staged."""
        count, self._pending = self._pending, 0
        if not count:
            return
        at = self._staged[count - 1]
        self._apply_staged(count)
        if at.entry.ops[-1].kind is OpKind.SEAL:
            self._check_seal(at.entry)
        self._checkpoint(at.entry, at.pos)
        if self.sealed is not None:
            self._promote(at.entry)

    def _settle_before(self, refused: JournalError) -> None:
        """An entry was refused: the points read before it are good, and the target
        keeps them (it would have had them at once without the checkpoint interval)."""
        try:
            self._settle()
        except (X2XError, OSError) as e:
            log.warning("pair %s: could not checkpoint the points read before the refused "
                        "entry (%s): %s", self.spec.name, refused, e)

    def _checkpoint(self, entry: Entry, pos: Position) -> None:
        """``entry`` (at ``pos``) and everything before it is applied: fsync, then record."""
        self._flush(pos)
        self._checkpointed_at = time.monotonic()
        self._ahead = False
        self.checkpointed = pos
        self._last_digest = entry.digest.hex()
        self.store.save(Checkpoint(self.spec.name, self.target, pos, self._last_digest,
                                   now_ms()))
        self.stats.checkpoints += 1
        self._publish_comparison(pos)
        if self.on_checkpoint:
            self.on_checkpoint(pos)

    def _flush(self, pos: Position) -> None:
        """fsync the target before the checkpoint at ``pos``, timed: a target disk that is
        slow to flush (shared with a busy broker, a slow device) delays every checkpoint,
        and so the RPO, by as much."""
        t0 = time.monotonic()
        self.vol.fsync()
        took = time.monotonic() - t0
        self._flushes.note(took, t0)
        telemetry.metrics().target_flush(self.spec.name, took, self.target)
        if took >= SLOW_FLUSH_S and self._slow_flushes.due("slow fsync", t0):
            log.warning("pair %s: the target %s took %.1f s to make its writes durable "
                        "(fsync) before the checkpoint at epoch %d seq %d; every checkpoint "
                        "waits for it, so the RPO grows by as much. Give the target a disk "
                        "that no busy writer (a broker's log, another volume) shares, or "
                        "a faster device", self.spec.name, self.target, took, pos.epoch,
                        pos.seq)

    # -- start: resume from the checkpoint, proving the journal still holds it ----------
    def _start(self, consumer: Consumer) -> None:
        if self.publish_status and self.limit is None and self.until is None:
            st = self._pair_state()
            self.grouped = bool(st is not None and st.group)
        cp = self.store.load()
        # The journal's start is a hint only (some brokers answer ListOffsets wrongly):
        # a reader is behind the base when the record it needs is gone *and* lies below it.
        low = self._journal_start(consumer)
        if cp is None and self.start is not None:
            if self.start.offset + 1 < low and self._bounded():
                raise self._behind(self.start, low)
            self.checkpointed = self._pos = self.start
            consumer.assign([TopicPartition(self.topic, 0, self.start.offset + 1)])
            return
        if cp is None:
            # Fetching starts now, while the control topic is read for the checks below
            # (a tenth of a second or more): a refusal still comes before any record is
            # handled.
            consumer.assign([TopicPartition(self.topic, 0, 0)])
            self._refuse_replay_after_loss()
            if low > 0 and self._bounded():
                raise self._behind(None, low)
            return
        self.checkpointed = self._pos = cp.position
        self._last_digest = cp.entry_digest
        consumer.assign([TopicPartition(self.topic, 0, cp.position.offset)])
        why = check_record(consumer, self.topic, cp.position.offset,
                           bytes.fromhex(cp.entry_digest), VERIFY_TIMEOUT)
        if why is not None and cp.position.offset < low:
            raise self._behind(cp.position, low)
        if why is not None:
            raise self._lost(cp, why)

    def _bounded(self) -> bool:
        """Does the pair keep a history window (so a base may have deleted records)?"""
        if not self.publish_status:
            return False        # a scratch replay reports on what is there
        st = self._pair_state()
        return st is not None and st.history.bounded

    def _journal_start(self, consumer: Consumer) -> int:
        """The journal's first offset (0 when the broker does not say)."""
        try:
            low, _ = offsets_of(consumer, self.topic, 3.0)
            return max(low, 0)
        except BrokerError:
            return 0        # the checks against the checkpoint's record still run

    def _behind(self, pos: Position | None, low: int) -> BehindBase:
        name = self.spec.name
        need = (f"its checkpoint (epoch {pos.epoch} seq {pos.seq}) at offset {pos.offset}"
                if pos is not None else "the journal from its first record")
        way = f"{self._rerun()} --reseed"
        return BehindBase(
            f"pair {name}: {self.target} needs {need}, but {self.topic} now starts at "
            f"offset {low}: the history base applied the records before it and they were "
            f"deleted (this reader was not registered then: new, released at its point in "
            f"time, or silent for longer than the reader TTL). Nothing was applied. Re-seed it from the history base "
            f"(a copy of the base and its checkpoint), then it follows: '{way}'")

    def _lost(self, cp: Checkpoint, why: str) -> JournalLost:
        p = cp.position
        return JournalLost(
            f"pair {self.spec.name}: the checkpoint of {self.target} (epoch {p.epoch} seq "
            f"{p.seq} at {self.topic} offset {p.offset}) is not in the journal: {why}. The "
            f"topic was recreated or the broker lost its data; nothing was applied. Resync "
            f"by block hashes, sending only what differs: 'x2x pair resync {self.spec.name}' "
            f"on the source's host (a running NBD capturer may keep serving)")

    def _pair_state(self) -> PairState | None:
        """The pair as the control topic says now (None: not known there)."""
        try:
            return control.get_pair(self.settings, self.spec.name)
        except PairNotFound:
            return None

    def _abandoned(self, epoch: int) -> bool:
        """Did the capturer give ``epoch`` up for a later one (producers/announce.py)?"""
        st = self._pair_state()
        return st is not None and epoch in st.abandoned_epochs

    def _refuse_replay_after_loss(self) -> None:
        """A target built by replaying the journal from its start needs the whole history;
        after a loss the journal holds only what came later, so replaying it would end in
        a target that looks consistent and is not."""
        if not self.publish_status:
            return          # a scratch replay (journal check) reports on what is there
        st = self._pair_state()
        if st is not None and not st.replayable:
            name = self.spec.name
            raise JournalLost(
                f"pair {name}: its journal lost its history (topic recreated or broker data "
                f"lost), so {self.target} cannot be rebuilt by replaying it from the start; "
                f"nothing was applied. The pair's target is repaired by block hashes: 'x2x "
                f"pair resync {name}' on the source's host. Other replicas can be built by "
                f"replay again once a full baseline is in the journal: restart the capturer "
                f"with 'x2x capture {name} --rebaseline'")

    # -- caught up? ----------------------------------------------------------------------
    def _capture_goal(self) -> tuple[int, int] | None:
        b = newest(read_beats(self.settings, {self.spec.name: self.spec}, strict=True),
                   self.spec.name, "capturer")
        return (b.epoch, b.seq) if b is not None else None

    def _reached(self, goal: tuple[int, int]) -> bool:
        # An unflushed tail stays staged and unapplied: the target ends at its last
        # consistency point, which is what a recovery point must be.
        return (self._pos.epoch, self._pos.seq) >= goal

    def _beat(self, beats: HeartbeatPublisher, state: str, force: bool = False) -> None:
        if not self.publish_status:
            return
        p = self.checkpointed
        if p.captured_at_ms:
            telemetry.metrics().checkpoint_age(
                self.spec.name, max(0.0, time.time() - p.captured_at_ms / 1000), self.target)
        rate = self.stats.bytes_applied / max(time.monotonic() - self._t0, 1e-3)
        # "needs": the first journal offset this reader still reads (its checkpoint's
        # record, checked again at its next start); the history base deletes nothing
        # from there on (journal/history.py). Empty: released.
        needs = "" if self.released else str(max(p.offset, 0))
        moved = (p.epoch, p.seq) != self._beaten
        if beats.beat(state, p.epoch, p.seq, p.epoch_bytes, p.captured_at_ms, rate,
                      {"staged_bytes": str(self._staged_bytes), "needs": needs,
                       "flush_s": f"{self._flushes.value(time.monotonic()):.3f}",
                       **({"group_cut": str(self.cut)} if self.grouped else {})}, force,
                      soon=APPLIED_BEAT_S if moved else None):
            self._beaten = (p.epoch, p.seq)

    def _mark_resync(self, error: JournalError) -> None:
        if not self.publish_status:
            return
        try:
            cause = JOURNAL_LOST if isinstance(error, JournalLost) else type(error).__name__
            control.publish(self.settings, ResyncNeeded(
                pair=self.spec.name, target=self.target, reason=str(error)[:500],
                cause=cause), self.role)
        except BrokerError:
            log.warning("could not mark pair %s as needing a resync", self.spec.name)
