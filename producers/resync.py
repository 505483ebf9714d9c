"""The capturer's side of verify, failback and failover: HASHES, resends and SEAL.

HASHES: each lock region of the source is read and hashed while its range lock is held
(the lock every client write takes across "local write + append"), and its HASHES op is
appended before the lock is released. So the hashes of a block are exactly the source's
content at that op's journal position, even while clients write: an applier that applies
everything before the op and then hashes its target compares like with like.

Resend: the current content of given extents, read under the same locks, as WRITE/ZERO
ops, then a FLUSH.

These run inside a live NBD capturer (asked through producers/control_watch.py) or,
when none runs, in the CLI on a capturer state continued from the StateStore
(:class:`LocalCapture`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

from infra.kafka import KafkaSettings
from infra.topics import JOURNAL_CONFIG, ensure_topic, journal_topic
from infra.volume import Volume, digest_of
from infra.volumes import open_volume
from journal.blocks import Extent, HASH_LEN, block_count, hash_buffer
from journal.errors import VolumeError, X2XError
from journal.events import HashesPublished, Resent, Sealed
from journal.ops import Op
from journal.pairs import PairSpec, PairState
from journal.clock import now_ms
from producers.journaling import RangeLocks
from producers.publisher import JournalPublisher, Sent
from producers.rate import TokenBucket
from producers.direction import prepare_direction, store_for
from producers.regions import journal_regions
from producers.state import CaptureState, StateStore
from schemas.cipher import JournalKey


class CaptureStateError(X2XError):
    """The local capturer state cannot be continued (unclean, or of another volume)."""


@dataclass(frozen=True)
class Published:
    """Where a request's ops landed in the journal."""

    epoch: int
    first_seq: int          # first seq of the entry holding the first op
    offset: int             # topic offset of that entry (-1 if unknown)
    flush_seq: int          # the FLUSH that ends them
    bytes: int              # record payload sent for them (hash map or resent data)

    def answer(self, kind: type[HashesPublished] | type[Resent], pair: str, source: str,
               request: str | None = None) -> HashesPublished | Resent:
        """The control event that answers a request with where its ops landed."""
        return kind(pair=pair, source=source, request=request, epoch=self.epoch,
                    first_seq=self.first_seq, offset=self.offset, seq=self.flush_seq,
                    bytes=self.bytes)


class _OffsetOf:
    """Catches the topic offset of the entry holding ``seq`` from delivery reports."""

    def __init__(self) -> None:
        self.seq = 0
        self.found: tuple[int, int] | None = None     # (entry first seq, offset)

    def __call__(self, entry: Sent, offset: int) -> None:
        if self.found is None and self.seq and entry.first_seq <= self.seq <= entry.last_seq:
            self.found = (entry.first_seq, offset)


def emit_hashes(vol: Volume, pub: JournalPublisher, locks: RangeLocks,
                block_size: int, timeout: float = 120.0) -> Published:
    """Journal HASHES of the whole volume then a FLUSH; wait until the broker has them."""
    region = locks.region
    buf = bytearray(region)
    catch = _OffsetOf()
    pub.on_delivered = catch
    first = 0
    try:
        for base in range(0, vol.size, region):
            view = memoryview(buf)[:min(region, vol.size - base)]
            with locks.hold(base, len(view)):
                vol.stream_into(base, view)
                op = Op.hashes(base, len(view), b"".join(hash_buffer(view, block_size)))
                seq = pub.append_at(op)
            if not first:
                first = catch.seq = seq
        flush = pub.flush_point()
        pub.wait_journaled(flush, timeout)
    finally:
        pub.on_delivered = None
    entry_seq, offset = catch.found or (first, -1)
    nbytes = block_count(vol.size, block_size) * HASH_LEN
    return Published(pub.journaled.epoch, entry_seq, offset, flush, nbytes)


def resend_extents(vol: Volume, pub: JournalPublisher, locks: RangeLocks,
                   extents: list[Extent], block_size: int, timeout: float = 120.0) -> Published:
    """Journal the current content of ``extents`` (WRITE, or ZERO for zero blocks) then a
    FLUSH; wait until the broker has them."""
    first = pub.appended_seq + 1
    sent = 0

    def spans() -> Iterator[tuple[int, int]]:
        for ext in extents:     # checked as reached, as the extents are journaled
            if ext.offset < 0 or ext.end > vol.size:
                raise VolumeError(f"extent {ext.offset}+{ext.length} lies outside the "
                                  f"source {vol.path} ({vol.size} bytes)")
            yield ext.offset, ext.length

    def count(_base: int, view: memoryview, written: list[int]) -> None:
        nonlocal sent
        sent += sum(len(view[off:off + block_size]) for off in written)

    journal_regions(vol, pub, locks, block_size, spans(), count)
    flush = pub.flush_point()
    pub.wait_journaled(flush, timeout)
    return Published(pub.journaled.epoch, first, -1, flush, sent)


class LocalCapture:
    """The capturer side run by the CLI when no capturer serves the source: continues the
    saved capturer state (its epoch and next seq) for one request, then saves it again."""

    def __init__(self, state: PairState, settings: KafkaSettings,
                 key: JournalKey | None, new_epoch: bool = False) -> None:
        self.state, self.settings, self.key = state, settings, key
        self.spec: PairSpec = state.active_spec
        #: Start a new epoch at seq 1 (the journal lost the old one: ``x2x pair resync``).
        self.new_epoch = new_epoch

    def _open(self) -> tuple[StateStore, CaptureState, Volume, JournalPublisher]:
        store = store_for(self.state)
        prepare_direction(self.state, store)
        saved = store.load_state()
        if saved is None or not saved.clean:
            raise CaptureStateError(
                f"pair {self.spec.name}: no clean capturer state for {self.spec.source} on "
                f"this host ({'none saved' if saved is None else 'last run stopped unclean'});"
                f" run 'x2x capture {self.spec.name}' here first (or start the NBD capturer, "
                f"which answers this request itself)")
        vol = open_volume(self.spec.source, writable=True)
        if vol.size != self.spec.volume_size:
            vol.close()
            raise VolumeError(f"source {self.spec.source} is {vol.size} bytes, the pair "
                              f"expects {self.spec.volume_size}")
        if self.new_epoch:
            # Once: the requests after the first one continue the epoch it started.
            self.new_epoch = False
            saved = replace(saved, epoch=saved.epoch + 1, next_seq=1, epoch_bytes=0)
            # A recreated topic may be missing; records produced into it would be lost.
            ensure_topic(self.settings.check_reachable(), journal_topic(self.spec.name),
                         JOURNAL_CONFIG)
        link = self.state.link          # the pair's --max-rate covers resyncs too
        pub = JournalPublisher(self.settings, self.spec.name, saved.epoch, saved.next_seq,
                               saved.epoch_bytes, key=self.key, instance=self.spec.source,
                               limit=TokenBucket(link.rate_at) if link.limited else None)
        return store, saved, vol, pub

    def _run(self, work: Callable[[Volume, JournalPublisher], Published]) -> Published:
        store, saved, vol, pub = self._open()
        try:
            saved.clean = False
            store.save(saved)
            result = work(vol, pub)
            pub.drain()
            j = pub.journaled
            store.save(CaptureState.closed(j, saved.block_size, saved.volume_size))
            pub.beat("stopped", force=True)
            return result
        finally:
            pub.close()
            vol.close()

    # The CaptureSide surface of consumers/capture_side.py: each returns its answer, as
    # the event a live capturer would have published.
    def hashes(self) -> HashesPublished:
        p = self._run(lambda vol, pub: emit_hashes(vol, pub, RangeLocks(),
                                                   self.spec.block_size))
        return p.answer(HashesPublished, self.spec.name, self.spec.source)

    def resend(self, extents: list[Extent]) -> Resent:
        p = self._run(lambda vol, pub: resend_extents(vol, pub, RangeLocks(), extents,
                                                      self.spec.block_size))
        return p.answer(Resent, self.spec.name, self.spec.source)

    def seal(self) -> Sealed:
        """SEAL the source as it is (nothing serves it, so nothing writes to it)."""
        refused_at = now_ms()
        digest = b""

        def work(vol: Volume, pub: JournalPublisher) -> Published:
            nonlocal digest
            vol.fsync()
            digest = digest_of(vol)
            seq = pub.append_at(Op.seal(vol.size, digest))
            pub.wait_journaled(seq)
            return Published(pub.journaled.epoch, seq, -1, seq, 0)
        p = self._run(work)
        return Sealed(pair=self.spec.name, source=self.spec.source, epoch=p.epoch,
                      seq=p.flush_seq, digest=digest, refused_at_ms=refused_at)
