"""The journaling volume: the NBD capturer's backend. Every change a client makes to the
source is written locally, then journaled, in the order the changes completed.

Ordering: a change takes the range locks of the blocks it touches across "local write +
journal append", so two changes to the same block reach the journal in the order they
reached the source (changes to disjoint blocks commute, so their relative order does not
matter). The baseline reader takes the same locks across "read block + append", which is
what keeps a baseline from overtaking a write (journal/DESIGN.md rule 7). The append only
queues the op; Kafka round trips happen outside the locks.

Modes (what a client waits for):

- ``async``: a write is acknowledged once it is on the source, and a FLUSH once the writes
  before it are durable on the source (fsync); the FLUSH keeps its place in the journal
  and ships behind the data, so it is still a consistency point on every target. The
  application runs at the source's speed; the RPO is the journal's lag (DRBD protocol A).
- ``flush-sync``: writes as in async, a FLUSH returns only once everything before it is
  journaled (DRBD protocol B): RPO 0 at every FLUSH, at a broker round trip per FLUSH.
- ``sync``: a write is acknowledged only once the broker acknowledged its journal entry,
  and fails with EIO otherwise (DRBD protocol C).

In async and flush-sync the journal reads a write's bytes back from the source when the
broker has room (producers/deferred.py). The write-intent bitmap keeps every write a
crash of the capturer's host may have left unjournaled: an async FLUSH's consistency
point clears its blocks only once that FLUSH is journaled (:meth:`JournalingVolume.settle`).
"""
from __future__ import annotations

import enum
import errno
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

from infra.volume import Volume
from journal.choices import parse_choice
from journal.errors import BacklogFull, X2XError
from journal.ops import Op, OpKind
from journal.runs import write_op
from producers.deferred import DeferredWrites
from producers.health import Condition, Health
from producers.intent import Checkpoint, IntentBitmap
from nbd.server import Shutdown
from producers.publisher import JournalPublisher

log = logging.getLogger("x2x.capture")

#: Bytes covered by one lock region. A baseline chunk is one region, so it holds exactly
#: one lock while it reads and appends; a client write takes one lock per region it spans.
REGION = 4 << 20
#: Number of lock stripes; region ``i`` uses stripe ``i % STRIPES``. 1 means one lock.
STRIPES = 64
#: Clients count as busy for this long after their last change (burst absorption).
QUIET = 0.02


class Mode(str, enum.Enum):
    """When a client's write and FLUSH are acknowledged (see the module doc)."""

    ASYNC = "async"             # both on the source; the journal follows
    FLUSH_SYNC = "flush-sync"   # writes on the source, FLUSH once journaled
    SYNC = "sync"               # each write once journaled

    @classmethod
    def parse(cls, text: str) -> "Mode":
        return parse_choice(cls, text, "--mode", "'async' (the application waits for the "
                            "source only), 'flush-sync' (a FLUSH also waits for the "
                            "journal) or 'sync' (every write waits for the journal)")

    @property
    def defers(self) -> bool:
        """Do writes return before their journal entry is acknowledged?"""
        return self is not Mode.SYNC


class RangeLocks:
    """Striped locks over byte ranges: region ``offset // region`` maps to one stripe.

    A range takes the stripes of all regions it spans, in stripe order, so two ranges
    never deadlock; ranges that share a block always share a stripe.
    """

    def __init__(self, region: int = REGION, stripes: int = STRIPES) -> None:
        if region <= 0 or stripes <= 0:
            raise ValueError("region and stripes must be positive")
        self.region, self.stripes = region, stripes
        self._locks = [threading.Lock() for _ in range(stripes)]

    def stripes_of(self, offset: int, length: int) -> list[int]:
        first = offset // self.region
        last = (offset + max(length, 1) - 1) // self.region
        if last - first + 1 >= self.stripes:
            return list(range(self.stripes))
        return sorted({i % self.stripes for i in range(first, last + 1)})

    def hold_all(self) -> ContextManager[None]:
        """Hold every stripe: no change is between its local write and its append."""
        return self._hold_many(list(range(self.stripes)))

    def hold(self, offset: int, length: int) -> ContextManager[object]:
        """The locks of ``[offset, offset + length)``, to hold for the block of a with."""
        first = offset // self.region
        if (offset + max(length, 1) - 1) // self.region == first:
            # The common case, on every client write: the stripe's lock itself, without
            # a generator's context manager or the list walk.
            return self._locks[first % self.stripes]
        return self._hold_many(self.stripes_of(offset, length))

    @contextmanager
    def _hold_many(self, taken: list[int]) -> Iterator[None]:
        for i in taken:
            self._locks[i].acquire()
        try:
            yield
        finally:
            for i in reversed(taken):
                self._locks[i].release()


@dataclass
class CaptureCounters:
    """What clients changed through this capturer (for heartbeats and the final report)."""

    ops: int = 0          # WRITE, ZERO, TRIM and FLUSH requests journaled
    bytes: int = 0        # payload bytes of those requests
    flushes: int = 0
    cuts: int = 0         # consistency points the capturer made on its own (no client FLUSH)


class JournalingVolume:
    """A :class:`nbd.server.Backend` over the source volume that journals every change.

    ``dirty`` marks blocks written since the hash map was last true, so the capturer can
    re-hash just those at a clean stop instead of hashing on the write path.

    The publisher is the capturer's to replace (:meth:`use`); each request takes it once,
    under its range lock, so a request never mixes two epochs' publishers. A failed journal is reported to the
    capturer's :class:`~producers.health.Health`, which every request consults.
    """

    def __init__(self, vol: Volume, pub: JournalPublisher, mode: Mode, block_size: int,
                 locks: RangeLocks | None = None, journal_timeout: float = 60.0,
                 health: Health | None = None,
                 intent: IntentBitmap | None = None,
                 fence: Callable[[], str | None] | None = None) -> None:
        self.vol, self.pub, self.mode, self.block_size = vol, pub, mode, block_size
        self.size = vol.size
        self.locks = locks or RangeLocks()
        self.journal_timeout = journal_timeout
        self.counters = CaptureCounters()
        self.dirty = bytearray(-(-vol.size // block_size))
        self.health = health or Health()
        #: Why writes must be refused (a lapsed lease, producers/lease.py), or None.
        self.fence = fence
        #: The write-intent bitmap (producers/intent.py).
        self.intent = intent
        #: Journaled writes whose bytes the journal has yet to read from the source.
        self.deferred = DeferredWrites(vol)
        self._closing = False
        self._count_lock = threading.Lock()
        self._last_change = 0.0
        #: async mode: the consistency point whose FLUSH is on its way to the broker (the
        #: publisher it went to, its seq, the bitmap's checkpoint); one at a time.
        self._point: tuple[JournalPublisher, int, Checkpoint] | None = None
        self._point_lock = threading.Lock()
        #: A consistency point went by without a bitmap point (another one was open): the
        #: next cut makes one even if no write came since, so the bitmap clears what is
        #: journaled without waiting for the next write.
        self._owed = False

    #: NBD_FLAG_CAN_MULTI_CONN holds for this backend: a FLUSH on one connection covers
    #: the completed writes of every connection, on the source and in the journal.
    #: Every connection of the export shares this one object (nbd_capture.py registers
    #: it once), so they share ``vol``, ``pub`` and the intent bitmap. A write is replied
    #: to only after :meth:`_change` returned, i.e. after its local write and after its
    #: op was appended to ``pub`` (under its range lock). :meth:`flush` then fsyncs the
    #: one shared volume fd (the source: every connection's writes) and appends a FLUSH
    #: op to the one publisher, whose seq comes after every
    #: op appended before it, whichever connection appended it. So the FLUSH is a
    #: consistency point covering all of them: flush-sync and sync wait until the broker
    #: has it all; async returns once the source is durable and the FLUSH ships behind
    #: that same data. FUA fsyncs the same shared volume. There is no per-connection
    #: cache anywhere (reads go to the volume), so one connection's FLUSH/FUA is seen
    #: by all.
    multi_conn = True

    @property
    def quick_writes(self) -> bool:
        """Do writes return without waiting for the broker (nbd/server.py serves them on
        the reader thread)? In async and flush-sync modes a write waits only for the
        local write and its append (and, rarely, a range lock or a full backlog's room);
        in sync mode it waits for the broker's acknowledgement."""
        return self.mode.defers

    @property
    def journals_later(self) -> bool:
        """Does a WRITE's reply wait for the broker (sync mode)? The NBD server then
        writes with :meth:`pwrite_then` and replies from its completion."""
        return self.mode is Mode.SYNC

    @property
    def quick_flush(self) -> bool:
        """Does a FLUSH return without waiting for the broker? In async mode it waits for
        the source's fsync and its append only (journal/DESIGN.md rule 12)."""
        return self.mode is Mode.ASYNC

    # -- the Backend surface -------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        # No lock: a read racing a write may see either, as on any disk.
        return self.vol.pread(offset, length)

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        """:meth:`pread` if the page cache holds all of it, else None (Volume.pread_cached)."""
        return self.vol.pread_cached(offset, length)

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        # The source's own allocation: every change reaches it before its reply, and a
        # ZERO or TRIM punches holes there (infra/volume.py), so its holes are zeros.
        return self.vol.extents(offset, length, limit)

    def zero_is_fast(self) -> bool:
        # A ZERO op is journaled without data whatever the volume, so fast depends on
        # the source alone: a punched hole, or a device that offloads write-zeroes.
        return self.vol.zero_is_fast()

    def cache(self, offset: int, length: int) -> None:
        self.vol.cache(offset, length)

    def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        # No copy: the server hands each request a buffer of its own (nbd/server.py).
        # One byte repeated (dd from /dev/zero, zerofree before a migration, a wipe with
        # 0xFF) is journaled as a ZERO or FILL op: the same bytes on every target, and
        # no such run in the journal, which Kafka's compression stores in next to
        # nothing and an applier's fetch, bounded in stored bytes, would decompress to
        # gigabytes.
        op = write_op(offset, data)
        self._change(op, fua, lambda: self.vol.pwrite(offset, data))

    def zero(self, offset: int, length: int, fua: bool) -> None:
        self._change(Op.zero(offset, length), fua, lambda: self.vol.zero(offset, length))

    def trim(self, offset: int, length: int) -> None:
        # A trimmed range reads back as zeros on the source, and so on every target.
        self._change(Op.trim(offset, length), False, lambda: self.vol.zero(offset, length))

    def flush(self) -> None:
        if self.mode is Mode.ASYNC:
            self.flush_local()()
            return
        pub, cp = self._durable()
        ok = False
        try:
            ok = self._journal(pub, lambda: pub.wait_journaled(pub.flush_point(),
                                                               self.journal_timeout))
        finally:    # sync mode raises EIO: the point must still be closed
            if cp is not None:
                (self.intent.end if ok else self.intent.abort)(cp)
        self._check_fence()
        if ok:
            with self._count_lock:
                self.counters.ops += 1
                self.counters.flushes += 1

    def flush_local(self) -> Callable[[], None]:
        """An async FLUSH in two steps (journal/DESIGN.md rule 12): now, what the client
        waits for; returned, the FLUSH op's append, which the NBD server runs once the
        client has its reply (a database's every commit waited ~50 us longer for it)."""
        pub, cp = self._durable()
        return lambda: self._flush_behind(pub, cp)

    def _durable(self) -> tuple[JournalPublisher, Checkpoint | None]:
        """A FLUSH's local part: the source's fsync, then the bitmap's point its FLUSH op
        clears once journaled; returns the publisher that op goes to, and that point."""
        self._check_open()
        self.vol.fsync()
        cp = None
        if self.intent is not None:
            cp = self.intent.begin()
            self._owed = self._owed or cp is None
        return self.pub, cp

    def _flush_behind(self, pub: JournalPublisher, cp: Checkpoint | None) -> None:
        """async FLUSH: queue the consistency point behind the data and return; the
        bitmap's point ends when the broker has it (:meth:`settle`)."""
        at = [0]

        def append() -> None:
            at[0] = pub.flush_point(client=True, ship=True)
        ok = self._journal(pub, append)
        if cp is not None:
            if ok:
                with self._point_lock:
                    self._point = (pub, at[0], cp)
            else:
                self.intent.abort(cp)
        with self._count_lock:
            self.counters.ops += 1
            self.counters.flushes += 1
        self.settle()

    def cut(self, interval: float) -> bool:
        """A consistency point without a client FLUSH, once writes have followed the last
        point for ``interval`` seconds (journal/DESIGN.md rule 16): a FLUSH op appended
        behind every write completed so far, with no fsync of the source, so it claims
        nothing about the source's durability. The bitmap's point for it ends once the
        broker has it, as for an async FLUSH (:meth:`settle`). Called from the capturer's
        tick; returns whether it cut."""
        owed = self._owed and self._point is None
        if (self._closing or self.health.condition is Condition.DEGRADED
                or not self.pub.cut_due(interval, idle=owed)):
            return False
        return self.point(Op.flush()) is not None

    def point(self, op: Op) -> int | None:
        """Append the FLUSH ``op`` as a consistency point of the capturer's own (a cut, a
        group cut's barrier) and return its seq; None if the journal refused it (the
        capturer then degrades). Its bitmap point ends as an async FLUSH's does."""
        pub = self.pub
        # Before the FLUSH op: what it may clear (None while another point is open:
        # clearing is then owed to a later point).
        cp = self.intent.begin() if self.intent is not None else None
        self._owed = self.intent is not None and cp is None
        try:
            seq = pub.flush_point(client=True, op=op)
        except X2XError as e:
            if cp is not None:
                self.intent.abort(cp)
            self.degrade(str(e), pub, journal_gone=not isinstance(e, BacklogFull))
            return None
        if cp is not None:
            with self._point_lock:
                self._point = (pub, seq, cp)
        with self._count_lock:
            self.counters.cuts += 1
        return seq

    def settle(self) -> None:
        """End the pending consistency point once its FLUSH is journaled, or give it up
        if its journal failed (its blocks stay marked and are resent). Called at every
        FLUSH and from the capturer's tick."""
        with self._point_lock:
            if self._point is None:
                return
            pub, seq, cp = self._point
            if pub is self.pub and self.health.condition is not Condition.DEGRADED:
                if pub.journaled.seq < seq:
                    return
                self.intent.end(cp)
            else:
                self.intent.abort(cp)
            self._point = None

    def busy(self) -> bool:
        """Are clients writing right now (a change within the last ``QUIET`` seconds)?"""
        return time.monotonic() - self._last_change < QUIET

    # -- lifecycle ----------------------------------------------------------------------
    def use(self, pub: JournalPublisher) -> None:
        """Journal into ``pub`` from now on (the capturer's new epoch). The promises made
        to the old publisher go with it: its journal is gone, the bitmap has the blocks."""
        self.deferred.clear()
        self.pub = pub

    def close(self) -> None:
        """Refuse every further request with ESHUTDOWN (requests already running finish)."""
        self._closing = True

    def quiesce(self) -> None:
        """Close, then wait until no change is between its local write and its append:
        from here on nothing more reaches the journal (a capture stopping while the NBD
        server it shares with a group's other exports keeps serving those)."""
        self.close()
        with self.locks.hold_all():
            pass

    # -- internals ----------------------------------------------------------------------
    def _change(self, op: Op, fua: bool, local: Callable[[], None]) -> None:
        pub, seq = self._record(op, fua, local)
        if seq:
            # The op may sit in a half-full entry: the publisher's writer closes it as
            # soon as it is free, with whatever other writers queued meanwhile (group
            # commit, JournalPublisher._choose).
            self._journal(pub, lambda: pub.wait_journaled(seq, self.journal_timeout))
        self._check_fence()     # a request that waited past the lease is not acknowledged

    def pwrite_then(self, offset: int, data: memoryview,
                    done: Callable[[OSError | None], None],
                    then: Callable[[], None] | None = None) -> None:
        """A sync-mode WRITE without FUA, with no thread waiting for the broker: the local
        write and its append now, then ``done(None)`` once the broker has it, or
        ``done(error)`` (EIO: the journal failed, or the capturer was fenced meanwhile),
        from the publisher's poller thread (JournalPublisher.when_journaled), and
        ``then()`` once after the ``done`` calls made with it. Raises what :meth:`pwrite`
        would raise before the append."""
        pub, seq = self._record(write_op(offset, data), False,
                                lambda: self.vol.pwrite(offset, data))

        def journaled(failed: str | None) -> None:
            try:
                if failed is not None:
                    self.degrade(failed, pub)
                    raise OSError(errno.EIO, f"journal unavailable: {failed}")
                self._check_fence()
            except OSError as e:
                done(e)
                return
            done(None)
        pub.when_journaled(seq, journaled, then, ship=False)

    def ship(self) -> None:
        """Send the journal the writes :meth:`pwrite_then` appended (the NBD reader, once
        it has read what its client sent): they go out together, from this thread."""
        self.pub.ship()

    def _record(self, op: Op, fua: bool,
                local: Callable[[], None]) -> tuple[JournalPublisher, int]:
        """Write ``op`` locally and append it: the publisher it went to, and in sync mode
        the seq to wait for (0: nothing to wait for)."""
        self._check_open()
        failed = self.health.reason
        if failed is not None and self.mode is Mode.SYNC:
            # Never acknowledge a write the journal cannot hold.
            raise OSError(errno.EIO, f"journal unavailable: {failed}")
        seq = 0
        self._last_change = time.monotonic()
        with self.locks.hold(op.offset, op.length):
            if self._closing:   # closed since the check above: see :meth:`quiesce`
                raise Shutdown("the capturer is stopping")
            # Marked before the local write: a crash from here on resends these blocks.
            token = self.intent.mark(op.offset, op.length) if self.intent else 0
            appended = False
            try:
                # Deferred ops this change overtakes keep the bytes they wrote.
                self.deferred.read_overlapping(op.offset, op.length)
                local()
                self._mark_dirty(op.offset, op.length)
                # Taken once, here: after the mark and the local write, as a new epoch's
                # resend reads the marks only once the new publisher is in place, so a
                # change either reaches that publisher or is resent by it.
                pub = self.pub
                ops = self._journal_form(pub, op)
                appended = self._journal(pub, lambda: pub.append_many(ops, client=True))
                if appended and self.mode is Mode.SYNC:
                    # Read under the lock: at or after our op, so waiting for it is enough.
                    seq = pub.appended_seq
            finally:
                if token:
                    self.intent.done(token, appended)
        if fua:
            self.vol.fsync()
        with self._count_lock:
            self.counters.ops += 1
            self.counters.bytes += op.length
        return pub, seq

    def _journal_form(self, pub: JournalPublisher, op: Op) -> list[Op]:
        """The ops that journal a change just made: an async WRITE leaves its bytes on
        the source while the backlog fits (the client's buffer is not kept), unless the
        publisher keeps it in memory (a small write of a flushing client); anything else
        carries them."""
        if (op.kind is OpKind.WRITE and self.mode.defers
                and self.health.condition is not Condition.DEGRADED
                and not pub.keeps(op.length) and pub.can_defer(op.length)):
            return [Op.write(s.offset, s) for s in
                    self.deferred.defer(op.offset, op.length, pub.max_op_data, pub.note_early)]
        return [op]

    def _journal(self, pub: JournalPublisher, call: Callable[[], object]) -> bool:
        """Run one call of ``pub``, this request's publisher. On failure: sync mode fails
        the request with EIO; async mode keeps the source available and stops journaling
        (degraded: the capturer's recovery resends the marked blocks in a new epoch).
        Returns whether journaling still works."""
        failed = self.health.reason
        if failed is not None:
            if self.mode is Mode.SYNC:
                raise OSError(errno.EIO, f"journal unavailable: {failed}")
            return False
        try:
            call()
            return True
        except X2XError as e:
            # A new epoch may have replaced this request's publisher meanwhile: its
            # change stays marked in the bitmap and the new epoch's resend journals it.
            self.degrade(str(e), pub, journal_gone=not isinstance(e, BacklogFull))
            if self.mode is Mode.SYNC:
                raise OSError(errno.EIO, f"journal unavailable: {e}") from None
            return False

    def degrade(self, why: str, pub: JournalPublisher | None = None,
                journal_gone: bool = True) -> None:
        """Journaling into ``pub`` (default: the current publisher) stopped: a failed
        publisher, a stalled broker, or (``journal_gone`` False) a full backlog. Writes go
        on being kept on the source and marked, and the capturer's recovery resends them."""
        if pub is not None and pub is not self.pub:
            return
        if journal_gone:
            self.deferred.clear()   # their journal is gone; the bitmap has the blocks
        # else the queued ops still ship: their promises to read the source are kept.
        self.health.fail(why)

    def mark_all_dirty(self) -> None:
        """Every block's hash is unknown (re-hashed at the clean stop)."""
        self.dirty[:] = b"\x01" * len(self.dirty)

    def _mark_dirty(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset // self.block_size
        last = (offset + length - 1) // self.block_size
        self.dirty[first:last + 1] = b"\x01" * (last - first + 1)

    def _check_open(self) -> None:
        if self._closing:
            raise Shutdown("the capturer is stopping")
        self._check_fence()

    def _check_fence(self) -> None:
        fenced = self.fence() if self.fence is not None else None
        if fenced is not None:
            # Never acknowledge a write the promoted target would not have.
            raise OSError(errno.EIO, f"fenced: {fenced}")

