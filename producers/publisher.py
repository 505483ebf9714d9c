"""The ordered journal publisher: ops in, entries onto ``x2x.journal.<pair>``, in order.

Delivery reports, not produce calls, advance the journaled position, so "journaled"
always means "the broker acknowledged it". In-flight bytes are bounded: a caller that
outruns the broker leaves its writes on the source (producers/deferred.py: the writer
reads them when their turn comes) or queues records in the local spool
(producers/spool.py) while there is room, and waits here once there is none, instead of
buffering in memory without limit.

Appending only numbers ops and packs them into entries (cheap, under the lock). One
writer thread then signs, encrypts and encodes each entry and hands it to Kafka or the
spool, in seq order: that work (a digest over every payload byte, and for a pair with a
key the AES-GCM pass) stays off the thread that serves an NBD client, and blake3 runs
without the GIL, so it overlaps with the client's next request. One exception: when a
client waits for the open entry (sync capture) and the writer has nothing else to do,
the thread at hand sends it (the poller as the previous record's acknowledgement comes,
or an NBD reader about to wait for its client), which saves a wake-up of the writer at
every record; the writer takes nothing meanwhile, so the order holds.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from infra import keys, telemetry
from infra.heartbeat import HeartbeatPublisher
from infra.kafka import KafkaSettings
from infra.topics import journal_topic
from journal.batch import DEFAULT_BUDGET, Sequencer, join_entries, joinable, plain_entry
from journal.digest import digest_of
from journal.errors import BacklogFull, BrokerError
from journal.ops import CLOSING_KINDS, Deferred, Entry, Op, resolve
from journal.status import SeqTimes
from journal.clock import now_ms
from producers.rate import TokenBucket
from producers.spool import Spool
from schemas import codec
from schemas.cipher import JournalKey

log = logging.getLogger("x2x.publisher")
#: A completion waiting for the broker, and what runs once after it and the others
#: decided with it (JournalPublisher.when_journaled).
_Call = tuple[Callable[[str | None], None], Callable[[], None] | None]

#: How often a writer holding a burst looks again whether the clients went quiet.
BUSY_POLL = 0.01
#: librdkafka's linger for a journal nobody waits on (async capture). With the default
#: 5 ms and a small record per client FLUSH (~1,000/s under pgbench), librdkafka's broker
#: thread busy-polls while records linger: 110-190 us of CPU per record, a third of the
#: capturer's, on the cores the clients need. From 20 ms it sleeps (7 us per record,
#: tens of records per request). From 20 to 100 ms, under pgbench the broker takes ~10
#: produce requests a second instead of ~50, and its CPU went from 22 to 16 % of a
#: core: on two cores shared with the database, pgbench async went from 0.62-0.67
#: of qemu-nbd's tps to 0.75-0.78 (paired runs). It adds up to 100 ms to the RPO,
#: beside the burst hold of seconds (bench lag: RPO p99 0.61-0.66 s either way);
#: flush-sync and sync, where a client waits on acks, linger far less (below).
ASYNC_LINGER_MS = 100.0
#: librdkafka's linger where a client waits for the acknowledgement (sync: every write;
#: flush-sync: its FLUSH): lingering is then time the client waits out. The batching
#: is ours instead (WAITED_RECORDS): a record goes out at once, and what comes while it
#: is in flight waits for the next.
WAITED_LINGER_MS = 0.0
#: Records in flight while a client waits for the journal (group commit, as a
#: database's WAL flush): the ops appended meanwhile go out together once the broker
#: acknowledges, one record, one signature and one report for them all. When the writer
#: closed a record for whatever it found at once, sync mode's random 4 KiB writes at
#: depth 16 on a written volume made 1.5 ops a record and cost twice the capturer's CPU
#: per write; one in flight (with no linger) made 8 a record. In bench/nbd_capture.py
#: 3,614 IOPS became 4,645; in bench/pgbench.py flush-sync went from 502 to 731 tps and
#: sync from 346 to 598. Two or three in flight, with random data (fio, depth 16): 6,377-
#: 6,667 IOPS against one's 7,851-8,079 (the broker's round trip grows with them).
WAITED_RECORDS = 1
#: How long, in async capture, a closed entry waits for the next ones to share its
#: record. Under a database every commit's FLUSH closes an entry (~1,000 a second):
#: one record each costs the capturer a signature, an encoding and a report, the
#: broker a record, and the applier a record and a checkpoint (two fsyncs). Beside
#: ASYNC_LINGER_MS it adds at most this much to the RPO.
ASYNC_COALESCE_MS = 10.0
#: A client write up to KEEP_MAX bytes, while its client flushes, carries its bytes
#: (JournalPublisher.keeps) as long as the bytes in memory stay under KEEP_QUEUED;
#: larger writes, bursts and a backlog stay on the source.
KEEP_MAX = 64 << 10
KEEP_QUEUED = 4 << 20
#: The most queued entries one record coalesces (the payload budget bounds it too).
MAX_COALESCED = 256



@dataclass(slots=True)
class Sent:
    """What an entry's acknowledgement needs, without its ops: kept for every entry in
    the spool or in flight, so neither pins the payloads in memory."""

    epoch: int
    first_seq: int
    last_seq: int
    epoch_bytes: int
    captured_at_ms: int
    digest: bytes
    handed_at: float = 0.0      # monotonic time it was handed to Kafka (0: spooled)

    @classmethod
    def of(cls, entry: Entry) -> "Sent":
        return cls(entry.epoch, entry.first_seq, entry.last_seq, entry.epoch_bytes,
                   entry.captured_at_ms, entry.digest)


@dataclass(frozen=True)
class Journaled:
    """The newest entry the broker has acknowledged."""

    epoch: int
    seq: int
    epoch_bytes: int
    captured_at_ms: int


class JournalPublisher:
    """Appends ops of one epoch to a pair's journal; safe to call from many threads.

    One poller thread serves all delivery reports, so callbacks never run on a thread
    that holds the lock, and waiters sleep on a condition instead of polling.
    """

    def __init__(self, settings: KafkaSettings, pair: str, epoch: int, next_seq: int = 1,
                 epoch_bytes: int = 0, key: JournalKey | None = None,
                 max_inflight_bytes: int = 64 << 20, budget: int = DEFAULT_BUDGET,
                 instance: str = "", spool: Spool | None = None,
                 max_queued_bytes: int = 16 << 20, hold: float = 0.0,
                 busy: Callable[[], bool] | None = None,
                 limit: TokenBucket | None = None, linger_ms: float | None = None,
                 coalesce_ms: float = 0.0) -> None:
        self.pair = pair
        #: The pair's bandwidth limit (producers/rate.py), shared by its publishers.
        self.limit = limit
        self.topic = journal_topic(pair)
        self.settings = settings
        #: ``linger_ms``: how long librdkafka gathers records into one request (None:
        #: the settings' default; see ASYNC_LINGER_MS).
        self.producer = Producer(settings.producer(
            **({"linger.ms": linger_ms} if linger_ms is not None else {})))
        #: How long a closed entry nobody waits for may wait for others to share its
        #: record (0: only those already queued; see ASYNC_COALESCE_MS).
        self.coalesce_ms = coalesce_ms
        self.seq = Sequencer(pair, epoch, next_seq, epoch_bytes, budget, sign=False)
        self.key = keys.remember(key) if key else None   # the control plane signs with it
        self.max_inflight = max_inflight_bytes
        #: Entries closed but not yet signed and handed over, oldest first, each with
        #: its bytes still on the source (deferred ops, producers/deferred.py); and the
        #: payload bytes held in memory (what appenders wait on beyond ``max_queued``)
        #: and on the source, over all of them.
        self._queue: deque[tuple[Entry, int]] = deque()
        self._queued = 0
        self._deferred = 0
        self.max_queued = max_queued_bytes
        #: async capture: a full backlog raises BacklogFull (the capturer degrades)
        #: instead of holding the client at the broker's pace.
        self.full_fails = False
        self._acked_at = 0.0        # monotonic time of the broker's last acknowledgement
        #: Burst absorption (producers/deferred.py): while ``busy()`` says clients are
        #: writing, deferred entries younger than ``hold`` seconds stay on the source.
        self.hold, self.busy = hold, busy
        #: The newest client FLUSH's seq: what precedes it is never held; and when it
        #: came (monotonic): for ``hold`` seconds after it nothing is held at all.
        self._ship_seq = -1
        self._shipped_at = float("-inf")
        self._appended_at = 0      # capture time of the newest op appended (ms)
        #: Payload bytes appended in this epoch (journaled or not): what clients were told.
        self._appended_bytes = epoch_bytes
        #: Capture time (ms) of the first op still in the sequencer (0: none), and of the
        #: first op of each entry the broker has not acknowledged: (last seq, ms), oldest
        #: first. The head is the oldest write the journal does not hold yet.
        self._open_since = 0
        self._firsts: deque[tuple[int, int]] = deque()
        #: When seqs were appended, for the RPO bound of a target that lags (status).
        self._seq_times = SeqTimes()
        #: The newest consistency point appended (FLUSH or SEAL): its seq, and when
        #: (monotonic); a cut is due once writes follow it (journal/DESIGN.md rule 16).
        self._point_seq = next_seq - 1
        self._point_at = time.monotonic()
        self.heartbeat = HeartbeatPublisher(self.producer, pair, "capturer", instance, key=key)
        self.journaled = Journaled(epoch, next_seq - 1, epoch_bytes, 0)
        self.ops_journaled = 0
        self.bytes_sent = 0            # record bytes handed to Kafka (before compression)
        #: Records acknowledged, and the seconds they spent from hand-over to report:
        #: the broker's share of a waiting client's time (bench/nbd_capture.py).
        self.records_acked = 0
        self.ack_seconds = 0.0
        #: (offset, entry digest) of the newest acknowledged record: lets a recovery or
        #: the next start check that the broker still holds it (producers/recovery.py).
        self.last_acked: tuple[int, bytes] | None = None
        self._inflight = 0
        #: Entries handed to Kafka and not yet acknowledged, oldest first.
        self._pending: deque[Sent] = deque()
        self.spool = spool
        #: Entries in the spool, oldest first.
        self._spooled: deque[Sent] = deque()
        self._error: str | None = None
        #: Called (entry, topic offset) for each acknowledged entry, on the poller thread.
        self.on_delivered: Callable[[Sent, int], None] | None = None
        self._lock = threading.RLock()
        #: Waits on ``_lock``. The hot paths (an append per client write) take
        #: ``_lock`` itself: the condition's ``with`` is a Python call, the lock's is C.
        self._cond = threading.Condition(self._lock)
        #: Threads in :meth:`wait_journaled`, who want it shipped now: (the seq each waits
        #: for, its own condition on ``_lock``). An acknowledgement wakes only those it
        #: covers (:meth:`_wake`): under sync mode's queue depth, waking every waiter at
        #: every acknowledgement cost each write as many GIL hand-offs as there were
        #: writes in flight.
        self._seq_waits: list[tuple[int, threading.Condition]] = []
        #: Calls waiting for the journal instead of threads (:meth:`when_journaled`):
        #: (seq, (call, then)), made by the poller thread, never holding the lock.
        self._on_journaled: list[tuple[int, _Call]] = []
        self._produce_lock = threading.Lock()
        #: The writer waits with nothing in hand (:meth:`_choose`); and another thread
        #: encodes and hands over a waited record (:meth:`_take_waited`), while which
        #: the writer takes nothing, so records still reach Kafka in seq order.
        self._writer_idle = False
        self._inline = False
        self._running = True
        self._poller = threading.Thread(target=self._poll_loop, name="x2x-publisher",
                                        daemon=True)
        self._poller.start()
        self._writer = threading.Thread(target=self._write_loop, name="x2x-journal-writer",
                                        daemon=True)
        self._writer.start()

    # -- appending -----------------------------------------------------------------
    def append(self, op: Op, wait: bool = True) -> None:
        """Queue one op; entries it completes go to the writer now. Then waits while the
        writer is more than ``max_queued`` bytes behind (see :meth:`_room`)."""
        with self._lock:
            self._raise_if_failed()
            self._appended_at = now = now_ms()
            pending = self.seq.pending_ops
            if not pending:
                self._open_since = now
            self._seq_times.note(self.seq.next_seq + pending - 1, now)
            self._appended_bytes += op.payload_bytes
            for entry in self.seq.add(op, now):
                self._enqueue(entry)
                self._open_since = now      # what follows in the sequencer came now
            if op.kind in CLOSING_KINDS:
                self._point_seq = self.seq.next_seq - 1
                self._point_at = time.monotonic()
            if wait:
                self._room()

    def _room(self, client: bool = False) -> None:
        """Wait while the writer is more than ``max_queued`` bytes behind; for a
        ``client``'s change with ``full_fails``, raise BacklogFull instead (async: the
        client must not wait). Baseline, resend and hashes always wait."""
        since = None
        while self._queued > self.max_queued:
            if client and self.full_fails and self._backlog_full(since):
                spool = (f", the spool holds {self.spool.bytes} of {self.spool.max_bytes} "
                         f"bytes" if self.spool is not None else ", no spool")
                raise BacklogFull(
                    f"the journal's backlog is full ({self._queued} bytes in memory{spool}): "
                    f"the broker at {self.settings.bootstrap} takes less than the source "
                    f"writes")
            since = since or time.monotonic()
            self._cond.wait(0.1)
            self._raise_if_failed()

    def _backlog_full(self, since: float | None) -> bool:
        """Is the backlog at its bound, not just the writer a moment behind (a client
        then waits briefly, at the writer's pace)? With a spool: the spool cannot take
        what is queued; without: the queue has not moved for a second."""
        if self.spool is not None:
            return (self._deferred + self.spool.bytes + self._queued
                    >= self.spool.max_bytes)
        return since is not None and time.monotonic() - since > 1.0

    @property
    def failed(self) -> bool:
        """Has this publisher given up (its journal is gone)?"""
        return bool(self._error)

    def append_at(self, op: Op) -> int:
        """Queue one op that is never split (not a large WRITE); return its seq."""
        with self._cond:
            seq = self.seq.next_seq + self.seq.pending_ops
            self.append(op)
            return seq

    def append_many(self, ops: list[Op], client: bool = False) -> None:
        """Queue the ops of one change, then wait for room once (or, for a ``client``,
        raise BacklogFull: the whole change is queued either way, never a part of it)."""
        with self._lock:
            for op in ops:
                self.append(op, wait=False)
            self._room(client)

    def flush_point(self, client: bool = False, op: Op | None = None,
                    ship: bool = False) -> int:
        """Append a FLUSH (consistency point; ``op``: this FLUSH, e.g. a group cut's
        barrier) and return its seq (``client``: see :meth:`append_many`); ``ship``: a
        client's FLUSH, which ends the burst hold for everything before it."""
        with self._cond:
            seq = self.seq.next_seq + self.seq.pending_ops
            if ship:
                self._ship_seq, self._shipped_at = seq, time.monotonic()
            self.append_many([op or Op.flush()], client)
            return seq

    def cut_due(self, interval: float, idle: bool = False) -> bool:
        """Have ops been appended since the last consistency point (or, with ``idle``,
        not necessarily), and is that point at least ``interval`` seconds old? (When the
        capturer cuts on its own.)"""
        with self._cond:
            return ((idle or self.seq.next_seq + self.seq.pending_ops - 1 > self._point_seq)
                    and time.monotonic() - self._point_at >= interval)

    def close_entry(self) -> None:
        """Send whatever ops are queued as an entry now (e.g. when the workload pauses)."""
        with self._cond:
            entry = self.seq.close(now_ms())
            if entry:
                self._enqueue(entry)

    def _enqueue(self, entry: Entry) -> None:
        # Never waits: the sequencer numbered this entry, so it must join the queue
        # before any later one (waiting for room happens after, in append).
        held, deferred = _payload(entry)
        self._closed_entry(entry, held)
        self._queue.append((entry, deferred))
        self._deferred += deferred
        self._cond.notify_all()

    def _closed_entry(self, entry: Entry, held: int) -> None:
        """Count a closed entry in, until it is handed over: when its first op came
        (the RPO's oldest unjournaled write) and its payload bytes in memory."""
        self._firsts.append((entry.last_seq, self._open_since or entry.captured_at_ms))
        self._queued += held

    # -- deferred writes (producers/deferred.py) -----------------------------------
    @property
    def max_op_data(self) -> int:
        """The most data one op carries: deferred writes are cut to this size."""
        return self.seq.max_op_data

    def can_defer(self, nbytes: int) -> bool:
        """May ``nbytes`` more of the backlog stay on the source? Only where a spool
        exists (async mode), and within its cap, counted together with it."""
        with self._lock:
            return (self.spool is not None and not self._error
                    and self._deferred + self.spool.bytes + nbytes <= self.spool.max_bytes)

    def keeps(self, nbytes: int) -> bool:
        """Should a client's write of ``nbytes`` travel in memory rather than wait on the
        source for its turn? Yes while its client flushes (no burst is held, so its entry
        ships within a linger anyway), the write is small and the bytes held in memory
        stay under KEEP_QUEUED. A database rewrites its WAL page at every commit: each
        deferred write was read back from the source before its overwrite, and every
        other one when its record was encoded."""
        return (nbytes <= KEEP_MAX and self._queued + nbytes <= KEEP_QUEUED
                and self._flushed_lately())

    def _flushed_lately(self) -> bool:
        """Did a client FLUSH within ``hold`` seconds? Then its writes are no burst:
        nothing is held, and its small writes travel in memory."""
        return time.monotonic() - self._shipped_at < self.hold

    def note_early(self, nbytes: int) -> None:
        """Deferred bytes were read before their turn (about to change on the source):
        from now on they are held in memory."""
        with self._cond:
            self._deferred -= nbytes
            self._queued += nbytes

    @property
    def deferred_bytes(self) -> int:
        """Bytes of the backlog still on the source, to be read when their turn comes."""
        return self._deferred

    # -- the writer thread ---------------------------------------------------------
    # The only thread that touches the spool, and the only one that produces journal
    # records except a waited entry sent while it idles (_take_waited), so records
    # reach Kafka in seq order without holding the lock across any I/O.
    def _write_loop(self) -> None:
        held: _Encoded | None = None       # encoded, waiting for room
        while True:
            with self._cond:
                step, item = self._choose(held)
            try:
                if step == "stop":
                    return
                if step == "sleep":
                    time.sleep(item)        # type: ignore[arg-type]
                elif step == "drop":
                    self._drop()
                    held = None
                elif step == "ship":
                    value = self.spool.pop()
                    assert value is not None, "spool and its index disagree"
                    self._produce(value, item)
                elif step == "encode":
                    held = self._encode(item)
                else:           # "send" or "spool" the held record
                    assert held is not None
                    if step == "send":
                        self._produce(b"".join(held.parts), held.sent)
                    else:
                        self.spool.push(held.parts)
                    with self._cond:
                        if step == "spool":
                            self._spooled.append(held.sent)
                        self._queued -= held.data_bytes
                        self._cond.notify_all()
                    held = None
            except Exception as e:  # noqa: BLE001 - every waiter must learn of it
                self._writer_failed(e)

    def _writer_failed(self, e: Exception) -> None:
        """Encoding or handing over a record failed: every waiter must learn of it."""
        with self._cond:
            self._error = self._error or (f"the journal writer of {self.topic} "
                                          f"failed: {type(e).__name__}: {e}")
            self._wake()

    def _choose(self, held: "_Encoded | None") -> tuple[str, object]:
        """What the writer does next; waits (lock held) until there is something."""
        while True:
            if self._error or not self._running:
                busy = held is not None or self._queue or self._spooled or (
                    self.spool is not None and len(self.spool))
                return ("drop" if busy else "stop"), None
            if self._inline:            # another thread hands a record over: after it
                self._cond.wait(0.1)
                continue
            window = self._inflight <= self.max_inflight
            if self._spooled and window:
                return "ship", self._spooled.popleft()
            if held is not None:
                if not self._spooled and window:
                    return "send", None
                if self.spool is not None and self.spool.fits(len(held)):
                    return "spool", None
            elif self._queue:
                head, deferred = self._queue[0]
                if (not deferred or self._queued > self.max_queued
                        or (window and not self._spooled and not self._holding(head))):
                    # An entry whose bytes are still on the source waits there, not in
                    # the spool, until the broker has room and the burst is over:
                    # unless memory is short behind it.
                    wait = self._coalescing(head)
                    if wait <= 0:
                        return "encode", self._take_run()
                    # Asleep, not on the condition: every append notifies it.
                    return "sleep", wait
                if window and not self._spooled:      # held: look again soon
                    self._cond.wait(BUSY_POLL)
                    continue
            elif (self._waited() and self.seq.pending_ops
                  and len(self._pending) < WAITED_RECORDS):
                # Someone waits for ops of the open entry (sync mode's writes): close it
                # now, or once the record in flight is acknowledged (the report wakes
                # us, unless its thread sends the entry itself: _take_waited). What was
                # appended while the last record went out rides along in this one
                # (group commit): one record, one signature, one report for all the
                # writes in flight, not one each.
                self.close_entry()
                continue
            self._writer_idle = held is None
            self._cond.wait(0.1)
            self._writer_idle = False

    def _coalescing(self, head: Entry) -> float:
        """Seconds the writer waits for more entries to join ``head``'s record (0: none).
        Only while nobody waits for the journal and the queue is small: a young entry
        that may share its record waits up to ``coalesce_ms`` from its close."""
        if (self.coalesce_ms <= 0 or self._waited() or len(self._queue) >= MAX_COALESCED
                or self._queued >= self.seq.budget // 2 or not plain_entry(head)):
            return 0.0
        return (head.captured_at_ms + self.coalesce_ms - now_ms()) / 1000

    def _take_run(self) -> Entry:
        """Take the queue's head, coalesced with the closed entries behind it that may
        share its record (journal/batch.py): while the writer encodes or waits for room,
        the entries that queue up (one per client FLUSH under a database: ~1,000 a
        second) then go out as one record, one signature and one report, and the
        target checkpoints once for all of them, at the last one's point."""
        if not plain_entry(self._queue[0][0]):
            return self._queue.popleft()[0]         # a record of its own
        run: list[Entry] = []
        for entry, deferred in itertools.islice(self._queue, MAX_COALESCED):
            if run and deferred and self._holding(entry):
                break
            run.append(entry)
        count = joinable(run, self.seq.budget)
        for _ in range(count):
            self._queue.popleft()
        return join_entries(run[:count])

    def _waiter_came(self) -> None:
        """Someone waits for the journal now: wake the writer (a held burst ships, an
        open entry closes), unless that changes nothing it may do: nothing queued, and
        a waited record already in flight, whose acknowledgement wakes it. Under sync
        capture that was a wake-up at every write, for nothing: random 4 KiB writes at
        depth 16 made 2.0 context switches a write before, 1.5 after. Hold the lock."""
        if self._queue or (len(self._pending) < WAITED_RECORDS and not self._inline):
            self._cond.notify_all()

    def _waited(self) -> bool:
        """Does anyone wait for ops to be journaled (a thread or a call)? Hold the lock."""
        return bool(self._seq_waits or self._on_journaled)

    def _holding(self, head: Entry) -> bool:
        """Leave a burst's writes on the source while clients are still writing: the
        journal (and a broker on the same machine) then takes no CPU from them. Never
        past ``hold`` seconds, and never while anyone waits for the journal (a FLUSH).
        A client that flushed within ``hold`` seconds is not bursting: it makes its own
        consistency points, and holding its writes until the next would add the time to
        move a whole interval of them to every point's RPO (a writer flushing every
        0.5 s at 90 MB/s: RPO p99 1.06-1.19 s held, 0.83 s not)."""
        return (self.hold > 0 and not self._waited() and head.first_seq > self._ship_seq
                and not self._flushed_lately()
                and self.busy is not None and self.busy()
                and now_ms() - head.captured_at_ms < self.hold * 1000)

    def _encode(self, entry: Entry) -> "_Encoded":
        """Read deferred bytes, sign (over the plaintext), encrypt, encode: outside the
        lock."""
        entry, size, fresh = resolve(entry)
        if fresh:
            with self._cond:
                self._deferred -= fresh
        entry = replace(entry, digest=digest_of(entry, self.key.mac_key if self.key else None))
        parts = codec.encode_entry_parts(self.key.encrypt(entry) if self.key else entry)
        return _Encoded(parts, Sent.of(entry), size)

    def _produce(self, value: bytes, sent: Sent) -> None:
        """Hand one record to Kafka (writer thread, lock not held): the one place every
        journal byte goes out, so the one place the bandwidth limit is obeyed."""
        if self.limit is not None and not self.limit.take(
                len(value), lambda: bool(self._error) or not self._running):
            return
        with self._cond:
            self._inflight += len(value)
            self.bytes_sent += len(value)
            sent.handed_at = time.monotonic()
            self._pending.append(sent)     # before produce: its report may come at once
        with self._produce_lock:
            while not self._error:         # after fail(), nothing more goes out
                try:
                    self.producer.produce(self.topic, value, on_delivery=self._delivered)
                    return
                except BufferError:        # librdkafka's queue is full: the poller frees it
                    time.sleep(0.01)

    def _drop(self) -> None:
        """After a failure or at close: nothing queued or spooled will be sent."""
        with self._cond:
            self._queue.clear()
            self._queued = self._deferred = 0     # what they counted: the queue and held
            self._spooled.clear()
            self._cond.notify_all()
        if self.spool is not None:
            self.spool.clear()

    @property
    def spooled_bytes(self) -> int:
        """Record bytes waiting in the local spool for the broker."""
        return self.spool.bytes if self.spool is not None else 0

    # -- acknowledgements ----------------------------------------------------------
    def _poll_loop(self) -> None:
        while self._running:
            try:
                self.producer.poll(0.1)       # returns as soon as a report was served
                if self._error and self._on_journaled:
                    self._call_back(None)
            except KafkaException as e:
                # Fatal for this producer (e.g. a restarted broker forgot its producer id):
                # nothing more can be journaled through it; the capturer starts a new one.
                with self._cond:
                    self._error = self._error or (f"the journal producer of {self.topic} "
                                                  f"failed: {e}")
                    self._wake()
                time.sleep(0.1)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        acked = (0, 0)
        took: float | None = None     # seconds from hand-over to this report
        ready: list[_Call] = []
        with self._cond:
            self._inflight -= len(msg.value() or b"")
            entry = self._pending.popleft()
            if err is not None:
                self._error = (f"journal entry seq {entry.first_seq}..{entry.last_seq} of "
                               f"{self.topic} was not acknowledged by "
                               f"{self.settings.bootstrap}: {err.str()}")
            else:
                self._acked_at = time.monotonic()
                took = self._acked_at - entry.handed_at
                self.records_acked += 1
                self.ack_seconds += took
                before = self.journaled
                self.journaled = Journaled(entry.epoch, entry.last_seq, entry.epoch_bytes,
                                           entry.captured_at_ms)
                ops = entry.last_seq - entry.first_seq + 1
                acked = (ops, entry.epoch_bytes - (before.epoch_bytes
                                                   if before.epoch == entry.epoch else 0))
                self.ops_journaled += ops
                while self._firsts and self._firsts[0][0] <= entry.last_seq:
                    self._firsts.popleft()
                self.last_acked = (msg.offset(), entry.digest)
                if self.on_delivered is not None:
                    self.on_delivered(entry, msg.offset())
            if err is None and self._on_journaled:
                ready = self._take_calls(self.journaled.seq)
            waited = self._take_waited() if err is None else None
            # The writer has nothing to do while this thread sends the next record.
            self._wake(None if err is not None else self.journaled.seq,
                       writer=waited is None)
        if waited is not None:
            self._send_waited(*waited)
        self._run(ready, None)
        if err is not None:
            self._call_back(None)
        if took is not None:
            telemetry.metrics().journal_acked(self.pair, took)
        if acked[0]:
            telemetry.metrics().captured(self.pair, acked[0], max(0, acked[1]))

    def ship(self) -> None:
        """Send what :meth:`when_journaled` calls with ``ship=False`` wait for: on this
        thread when the writer would do just that (see :meth:`_take_waited`), else by
        waking the writer."""
        with self._lock:
            waited = self._take_waited()
            if waited is None:
                self._waiter_came()
        if waited is not None:
            self._send_waited(*waited)

    def _take_waited(self) -> tuple[Entry, int] | None:
        """Close the open entry that someone waits for (sync capture's writes) for
        this thread to send (:meth:`_send_waited`): the poller as the previous record's
        acknowledgement comes, or a caller of :meth:`ship`. Only when the writer would
        do just that and nothing else: it waits idle, nothing is queued, spooled or in
        flight (so librdkafka's queue has room: the poller never waits on itself), and
        no bandwidth limit may make the sender sleep. Handing it to the writer cost a
        wake-up and the lock and interpreter hand-offs around it at every record: at
        random 4 KiB writes at depth 16, 8 of the writer's context switches a record.
        (A limit set between this look and the hand-over holds the sender for one
        record's wait, once.) Returns the entry and its payload bytes in memory. Hold
        the lock."""
        if not (self._writer_idle and not self._inline and self._running
                and not self._error and (self.limit is None or self.limit.rate is None)
                and not self._queue and not self._spooled
                and self.seq.pending_ops and len(self._pending) < WAITED_RECORDS
                and self._waited()):
            return None
        entry = self.seq.close(now_ms())
        if entry is None:
            return None
        held, deferred = _payload(entry)
        if deferred:                    # bytes on the source: the writer reads them
            self._enqueue(entry)
            return None
        self._closed_entry(entry, held)
        self._inline = True
        return entry, held

    def _send_waited(self, entry: Entry, held: int) -> None:
        """Encode and hand over what :meth:`_take_waited` took, as the writer would."""
        try:
            encoded = self._encode(entry)
            self._produce(b"".join(encoded.parts), encoded.sent)
        except Exception as e:  # noqa: BLE001 - every waiter must learn of it
            self._writer_failed(e)
        finally:
            with self._cond:
                full = self._queued > self.max_queued       # appenders wait (_room)
                self._queued -= held
                self._inline = False
                if self._queue or full or self._error or not self._running:
                    self._cond.notify_all()

    def when_journaled(self, seq: int, call: Callable[[str | None], None],
                       then: Callable[[], None] | None = None, ship: bool = True) -> None:
        """Call ``call(None)`` once every op up to ``seq`` is acknowledged by the broker,
        or ``call(reason)`` once the journal failed (or closed) before: a wait without a
        thread (sync capture's writes reply from here). Made at once when already
        decided, else on the poller thread; never holding the publisher's lock. ``then``
        runs once after the calls decided together (equal ``then``s once for them all):
        an NBD connection sends the replies of one acknowledged record in one go.
        ``ship=False``: the caller calls :meth:`ship` before it waits for anything (an
        NBD reader, once it has read what its client sent), so the writes it appends
        meanwhile go out together, sent by that thread."""
        with self._lock:
            failed = self._error or (None if self._running else self._closed)
            if failed is None and self.journaled.seq < seq:
                self._on_journaled.append((seq, (call, then)))
                if ship:
                    self._waiter_came()
                return
        self._run([(call, then)], failed)

    @property
    def _closed(self) -> str:
        return f"the journal of {self.topic} closed before the broker had it"

    def _take_calls(self, journaled: int | None) -> list[_Call]:
        """Remove and return the calls ``journaled`` covers (None: all); hold the lock."""
        if journaled is None:
            calls, self._on_journaled = self._on_journaled, []
            return [c for _, c in calls]
        ready = [c for seq, c in self._on_journaled if seq <= journaled]
        if ready:
            self._on_journaled = [(s, c) for s, c in self._on_journaled if s > journaled]
        return ready

    def _call_back(self, reason: str | None) -> None:
        """Fail every waiting call with the journal's error (or ``reason``)."""
        with self._cond:
            why = self._error or reason or self._closed
            calls = self._take_calls(None)
        self._run(calls, why)

    def _run(self, calls: list[_Call], failed: str | None) -> None:
        """Make ``calls`` with ``failed``, then their ``then``s, each once, whatever
        failed before (a ``then`` may send what its calls only prepared)."""
        try:
            for call, _ in calls:
                self._safely(call, failed)
        finally:
            for then in dict.fromkeys(t for _, t in calls if t is not None):
                self._safely(then)

    def _safely(self, call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except Exception:  # noqa: BLE001 - the poller must serve every other report
            log.exception("a journal completion of %s failed", self.topic)

    def stalled_for(self) -> float:
        """Seconds the broker has acknowledged nothing while records wait for it (0.0:
        none in flight). A slow link that acknowledges steadily is not stalled, however
        long its oldest record waits; records still in the spool do not count either: a
        backlog is not a stall."""
        with self._cond:
            if not self._pending:
                return 0.0
            return time.monotonic() - max(self._pending[0].handed_at, self._acked_at)

    def fail(self, why: str) -> None:
        """Give up on this publisher: every waiter and later call raises BrokerError, and
        what is still queued is purged, so no entry of this epoch reaches the broker after
        the next epoch's."""
        with self._cond:
            self._error = self._error or why
            self._wake()               # the writer drops the queue and the spool
        with self._produce_lock:
            self.producer.purge()

    def _wake(self, journaled: int | None = None, writer: bool = True) -> None:
        """Wake the writer and appenders (unless not ``writer``), and the journal's
        waiters up to seq ``journaled`` (None: all of them, on a failure or the close);
        hold the lock."""
        if writer:
            self._cond.notify_all()
        for seq, waiter in self._seq_waits:
            if journaled is None or seq <= journaled:
                waiter.notify()

    def _raise_if_failed(self) -> None:
        if self._error:
            raise BrokerError(self._error)

    @property
    def appended_seq(self) -> int:
        """The last seq handed to the publisher (journaled or not)."""
        with self._lock:
            return self.seq.next_seq + self.seq.pending_ops - 1

    def wait_journaled(self, seq: int, timeout: float = 60.0) -> None:
        """Block until every op up to ``seq`` is acknowledged by the broker.

        ``timeout`` bounds a wait without progress: a long spool that drains steadily
        is waited for, a broker that acknowledges nothing is not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            last = self.journaled.seq
            me = (seq, threading.Condition(self._lock))
            self._seq_waits.append(me)
            self._waiter_came()
            try:
                while self.journaled.seq < seq:
                    self._raise_if_failed()
                    if self.journaled.seq != last:
                        last, deadline = self.journaled.seq, time.monotonic() + timeout
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokerError(
                            f"the journal of {self.topic} is not acknowledged up to seq "
                            f"{seq}: nothing acknowledged for {timeout:.0f} s; is "
                            f"{self.settings.bootstrap} up?")
                    me[1].wait(min(left, 0.5))
            finally:
                self._seq_waits.remove(me)
            self._raise_if_failed()

    def drain(self, timeout: float = 60.0) -> None:
        """Send queued ops and wait until all are acknowledged."""
        with self._cond:
            self.close_entry()
            last = self.seq.next_seq - 1
        self.wait_journaled(last, timeout)

    def unjournaled_since_ms(self) -> int:
        """Capture time of the oldest op appended that the broker has not acknowledged
        (0: the journal holds every op appended)."""
        with self._cond:
            if self._firsts:
                return self._firsts[0][1]
            return self._open_since if self.seq.pending_ops else 0

    @property
    def unjournaled_bytes(self) -> int:
        """Payload bytes appended in this epoch that the broker has not acknowledged."""
        with self._cond:
            return max(0, self._appended_bytes - self.journaled.epoch_bytes)

    def beat(self, state: str, detail: dict[str, str] | None = None, force: bool = False,
             rate_bps: float = 0.0, acked: Callable[[], None] | None = None) -> None:
        with self._cond:
            j = self.journaled
            # What clients were told is done and the journal may not hold yet (held on
            # the source, queued, spooled, in flight): status counts it as lag, and a
            # forced failover as lost when the source dies (journal/status.py).
            ahead = {"appended_seq": str(self.seq.next_seq + self.seq.pending_ops - 1),
                     "appended_at_ms": str(self._appended_at or j.captured_at_ms),
                     "appended_bytes": str(self._appended_bytes),
                     "unjournaled_since_ms": str(self.unjournaled_since_ms()),
                     "unjournaled_bytes": str(self.unjournaled_bytes),
                     "seq_times": self._seq_times.text()}
        self.heartbeat.beat(state, j.epoch, j.seq, j.epoch_bytes, j.captured_at_ms,
                            rate_bps, {**(detail or {}), **ahead}, force, acked)

    def close(self, timeout: float = 10.0) -> None:
        """Flush heartbeats and stop the threads; call drain() first to keep ops."""
        with self._cond:
            self._running = False
            self._wake()
        self._writer.join()
        self.producer.flush(timeout)
        self._poller.join()
        self._call_back(None)
        if self.spool is not None:
            self.spool.clear()


@dataclass(slots=True)
class _Encoded:
    """An entry as the writer holds it between encoding and handing over."""

    parts: list[bytes | memoryview]
    sent: Sent
    data_bytes: int     # its share of the publisher's queued bytes

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


def _payload(entry: Entry) -> tuple[int, int]:
    """An entry's payload bytes: (held in memory, still on the source)."""
    held = deferred = 0
    for op in entry.ops:
        if isinstance(op.data, Deferred):
            deferred += len(op.data)
        else:
            held += len(op.data)
    return held, deferred
