"""The trace capturer: live capture of a block device in use, without rerouting its I/O.

``x2x capture NAME --trace`` for a source that is a block device whose filesystem may be
mounted and written (the system disk of a running physical server). Nothing stands in
the workload's I/O path; instead:

1. **Tracing starts first.** A private tracefs instance (infra/tracefs.py) reports every
   completed write, discard or write-zeroes of the device; journal/tracemarks.py turns
   them into dirty blocks.
2. **Baseline** (or, when a clean stop left a hash map, a **compare**): the whole device
   is read (O_DIRECT: what the disk holds, not a stale page cache) and journaled, every
   block hashed into the *journaled map* (blake3 of the content last appended for each
   block). A block written meanwhile was marked by its completion and is read again.
3. **Pre-reading**: every ``POLL`` seconds the marked blocks are read and the ones whose
   hash differs from the journaled map are appended as WRITE/ZERO ops, so little is left
   for a cut.
4. **Consistency cuts** every ``cut_interval``: freeze the filesystem (infra/freeze.py),
   write a marker into the trace and read up to it (every write completed before the
   freeze is then marked), read and append what is marked, append a FLUSH, thaw. A cut
   longer than ``freeze_cap`` is abandoned (thawed, no FLUSH; what it read stays
   journaled and correct). DESIGN rule 17 says what a cut promises.
5. **Lost events are never silent**: an overrun or dropped event in the trace buffer, a
   marker that does not come back, or the instance removed, and the whole device is
   compared with the journaled map by block hashes; only differing blocks are sent,
   then a cut. A restart after a clean stop compares the same way (writes while x2x was
   not running were not traced).

The capturer owns its epoch, publisher, journaled map, dirty set and freeze figures.
"""
from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from infra.freeze import Freezer, mount_point_of
from infra.heartbeat import local_beat_path
from infra.kafka import KafkaSettings
from infra.tracefs import BlockTrace, TraceLost, traced_device
from infra.volume import Volume
from journal.blocks import HASH_LEN, block_count, hash_block
from journal.errors import BadInput, VolumeError
from journal.pairs import PairSpec
from journal.runs import RunBuilder, max_write
from journal.status import CAPTURE_BEAT_S
from journal.tracemarks import DirtyBlocks, FreezeTimes, parse_changes, split_lines
from producers.announce import abandon_epoch, announce_baseline
from producers.publisher import JournalPublisher
from producers.state import CaptureState, StateStore, plan_start
from producers.trace_resume import SNAPSHOT_EVERY, ResumePoint, forget as forget_resume
from schemas.cipher import JournalKey

log = logging.getLogger("x2x.capture")

#: How often completed writes are collected and pre-read.
POLL = 0.1
CHUNK = 8 << 20
DEFAULT_CUT_INTERVAL = 5.0
DEFAULT_FREEZE_CAP = 2.0
DEFAULT_BUFFER_KB = 8192
#: How often the freeze figures are logged (at INFO; the heartbeat carries them always).
LOG_EVERY = 60.0


@dataclass
class TraceReport:
    """What one run of the trace capturer did, for the CLI."""

    epoch: int = 0
    first_seq: int = 0
    last_seq: int = 0
    new_epoch: bool = False
    baseline: bool = False
    mount_point: str | None = None
    cuts: int = 0
    cuts_abandoned: int = 0
    freeze_p50_ms: float = 0.0
    freeze_p99_ms: float = 0.0
    freeze_max_ms: float = 0.0
    lost_events: int = 0
    compares: int = 0
    bytes_sent: int = 0
    clean: bool = False
    seconds: float = 0.0


@dataclass
class TraceCapture:
    """One pair's trace capturer: ``start()``, then ``run(stop_event)``."""

    spec: PairSpec
    settings: KafkaSettings
    store: StateStore
    key: JournalKey | None = None
    cut_interval: float = DEFAULT_CUT_INTERVAL
    #: The mount point to freeze; None: found from /proc/self/mountinfo; "": never freeze.
    freeze: str | None = None
    freeze_cap: float = DEFAULT_FREEZE_CAP
    buffer_kb: int = DEFAULT_BUFFER_KB
    beat_interval: float = CAPTURE_BEAT_S
    report: TraceReport = field(init=False, default_factory=TraceReport)
    times: FreezeTimes = field(init=False, default_factory=FreezeTimes)
    _phase: str = field(init=False, default="starting")
    _tail: bytes = field(init=False, default=b"")
    _need_compare: bool = field(init=False, default=False)
    #: Where the source starts on the device traced (a partition on its disk).
    _shift: int = field(init=False, default=0)
    _pass_done: int = field(init=False, default=0)
    _snapshot_at: float = field(init=False, default=-SNAPSHOT_EVERY)

    # -- start --------------------------------------------------------------------------
    def start(self) -> "TraceCapture":
        """Check the source, start tracing, decide the epoch, open the publisher."""
        spec = self.spec
        try:
            st = os.stat(spec.source)
        except OSError as e:
            raise VolumeError(f"cannot stat the source {spec.source}: {e.strerror}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise BadInput(f"--trace follows a block device's completed writes, but "
                           f"{spec.source} is not a block device; capture an image file with "
                           f"the scan capturer ('x2x capture {spec.name} --interval 30') or "
                           f"serve it with --nbd")
        self.vol = Volume(spec.source, direct=True)
        self._t0 = time.monotonic()
        self.trace = self.freezer = None
        try:
            if self.vol.size != spec.volume_size:
                raise VolumeError(
                    f"source {spec.source} is {self.vol.size} bytes but pair {spec.name} was "
                    f"created for {spec.volume_size}; recreate the pair for the new size")
            if self.freeze is None:
                self.freeze = mount_point_of(st.st_rdev) or ""
            if self.freeze and not os.path.isdir(self.freeze):
                raise BadInput(f"--freeze {self.freeze}: no such mount point")
            if self.freeze and os.stat(self.freeze).st_dev != st.st_rdev:
                log.warning("pair %s: %s does not look like the filesystem of %s (another "
                            "device number): cuts are consistent only if it is",
                            spec.name, self.freeze, spec.source)
            self.report.mount_point = self.freeze or None
            # Tracing first: a write from now on is marked, whatever is read after it.
            traced, self._shift = traced_device(st.st_rdev)
            self.trace = BlockTrace(traced, f"x2x-{spec.name}", self.buffer_kb).open()
            self.freezer = (Freezer(self.freeze, self.freeze_cap, str(self.trace.dir))
                            if self.freeze else None)
            self._open_epoch()
        except BaseException:
            self._close()
            raise
        if not self.freeze:
            log.warning("pair %s: %s has no mounted filesystem (and no --freeze): cuts are "
                        "not crash-consistent unless the application quiesces the device "
                        "(DESIGN rule 17)", spec.name, spec.source)
        return self

    def _open_epoch(self) -> None:
        spec, vol = self.spec, self.vol
        old_state, old_hashes = self.store.load()
        state, known = plan_start(old_state, old_hashes, spec.block_size, vol.size)
        continuing = state is old_state
        if old_state is not None and not continuing:
            abandon_epoch(self.settings, spec.name, old_state.epoch, state.epoch)
        # Stale from now until a clean stop saves the journaled map again.
        self.store.hashes.unlink(missing_ok=True)
        known = self._resume_point(old_state, known, continuing)
        state.clean = False
        self.store.save(state)
        self.state = state
        self.baseline = known is None
        self._announce = self.baseline
        # The map loaded is the one kept and updated: no copy of it (a GiB at 2 TiB).
        self.hashes = (known if known is not None
                       else bytearray(block_count(vol.size, spec.block_size) * HASH_LEN))
        self.dirty = DirtyBlocks(spec.block_size, vol.size, CHUNK)
        self.pub = JournalPublisher(self.settings, spec.name, state.epoch, state.next_seq,
                                    state.epoch_bytes, key=self.key, instance=spec.source)
        self.pub.heartbeat.local_copy = local_beat_path(spec.name, "capturer")
        self.buf = mmap.mmap(-1, CHUNK)      # page-aligned, as O_DIRECT wants
        self.runs = RunBuilder(max_write(spec.block_size))
        r = self.report
        r.epoch, r.first_seq, r.last_seq = state.epoch, state.next_seq, state.next_seq - 1
        r.new_epoch, r.baseline = not continuing, self.baseline

    def _resume_point(self, old: CaptureState | None, known: bytearray | None,
                      continuing: bool) -> bytearray | None:
        """Open the resume files (producers/trace_resume.py); after an unclean stop, the
        map to compare with from them (None: a baseline)."""
        d, bs, size = self.store.meta.parent, self.spec.block_size, self.vol.size
        rp = None
        if known is None and old is not None:
            rp = ResumePoint(d, bs, size)
            known = rp.load()
            if known is None:
                rp.close()
                rp = None
            else:
                log.info("pair %s: the last run stopped unclean; comparing the device with "
                         "the last acknowledged map instead of a baseline", self.spec.name)
        if known is None:
            forget_resume(d)      # a baseline: nothing of an older run may be resumed
        self.resume = rp or ResumePoint(d, bs, size)
        if continuing:
            self.resume.clear()   # a clean stop: everything was acknowledged
        if known is not None:
            self.resume.save(known)
        return known

    # -- run ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> TraceReport:
        """Baseline or compare, then pre-read and cut until ``stop``; a last cut and a
        clean stop."""
        clean = False
        try:
            self._full_pass(stop, compare=not self.baseline)
            if stop.is_set() and self.baseline:
                return self._finish(False)      # a baseline cut short: unclean
            if not stop.is_set():               # (a compare cut short ends below)
                self._capture(stop)
            # The last cut: with nothing lost, the journal then holds the device as the
            # frozen filesystem had it, and the journaled map describes it.
            self._poll()
            if self._need_compare:      # events lost lately: compare once more, to the end
                self._need_compare = False
                self._full_pass(threading.Event(), compare=True)
            clean = self._cut() and not self._need_compare
            self.pub.drain(120.0)
            return self._finish(clean)
        finally:
            if not clean and self.pub is not None:
                try:
                    self.beat("stopped-unclean")
                except Exception:  # noqa: BLE001 - already failing; the beat is a courtesy
                    pass
            self._close()

    def _capture(self, stop: threading.Event) -> None:
        """The first cut, then pre-reads, compares when events were lost, and a cut every
        ``cut_interval``, until ``stop``."""
        self._cut()
        self._phase = "capturing"
        next_cut = time.monotonic() + self.cut_interval
        next_beat = 0.0
        next_log = time.monotonic() + LOG_EVERY
        while not stop.wait(POLL):
            self._poll()
            if self._need_compare:
                self._need_compare = False
                self._full_pass(stop, compare=True)
                self._cut()
                self._phase = "capturing"
            self._pre_read()
            now = time.monotonic()
            if now >= next_cut:
                self._cut()
                next_cut = time.monotonic() + self.cut_interval
            self.pub.close_entry()
            self.resume.commit_if_acked(self.pub.journaled.seq, self.hashes)
            if now >= next_beat:
                next_beat = now + self.beat_interval
                self.beat()
            if now >= next_log:
                next_log = now + LOG_EVERY
                t = self.times
                log.info("pair %s: %d cuts (%d abandoned), freeze p50 %.1f ms, p99 %.1f ms, "
                         "max %.1f ms", self.spec.name, t.cuts, t.abandoned,
                         t.percentile(50) * 1000, t.percentile(99) * 1000, t.max * 1000)

    def _finish(self, clean: bool) -> TraceReport:
        j = self.pub.journaled
        if clean:
            self.resume.clear()
            self.store.save(CaptureState.closed(j, self.spec.block_size, self.vol.size,
                                                *(self._last_acked())),
                            self.hashes)
            self.beat("stopped")
        r = self.report
        r.last_seq, r.clean = j.seq, clean
        r.seconds = time.monotonic() - self._t0
        r.bytes_sent = self.pub.bytes_sent
        return r

    def _last_acked(self) -> tuple[int, str]:
        acked = self.pub.last_acked
        return (acked[0], acked[1].hex()) if acked else (-1, "")

    # -- reading and journaling ---------------------------------------------------------
    def _journal(self, offset: int, view: memoryview, only_changed: bool) -> None:
        """Append the blocks of ``view`` (read at ``offset``) that differ from the
        journaled map (all of them unless ``only_changed``), and record their hashes."""
        bs, hashes, pub, runs = self.spec.block_size, self.hashes, self.pub, self.runs
        touch = self.resume.touch
        for off in range(0, len(view), bs):
            block = view[off:off + bs]
            i = (offset + off) // bs * HASH_LEN
            h = hash_block(block)
            if only_changed and hashes[i:i + HASH_LEN] == h:
                continue
            hashes[i:i + HASH_LEN] = h
            touch(i // HASH_LEN)
            pub.append_many(runs.add_block(offset + off, block)[0])
        # The ops point into the read buffer: close the run before it is read into again.
        pub.append_many(runs.finish())

    def _read(self, offset: int, length: int) -> memoryview:
        view = memoryview(self.buf)[:length]
        self.vol.readinto(offset, view)
        return view

    def _full_pass(self, stop: threading.Event, compare: bool) -> None:
        """Read the whole device: a baseline journals every block, a compare only the
        blocks whose hash differs from the journaled map. Completed writes keep being
        collected between chunks (they are read again afterwards)."""
        self._phase = "comparing" if compare else "baseline"
        if compare:
            self.report.compares += 1
        self.dirty.take()       # all of it is read now; what changes meanwhile is marked
        size = self.vol.size
        self._pass_done = 0
        for base in range(0, size, CHUNK):
            if stop.is_set():
                if compare:
                    self._need_compare = True    # unfinished: it still has to be done
                return
            self._journal(base, self._read(base, min(CHUNK, size - base)), compare)
            self._pass_done = base
            self._poll()
        self._pass_done = size

    def _poll(self) -> None:
        """Mark what completed since the last poll; notice lost events."""
        try:
            text = self.trace.read()
            lost = self.trace.lost()
        except TraceLost as e:
            self._lose(f"{e}; tracing again")
            self.trace.open()
            return
        self._mark(text)
        if b"[LOST " in text:       # trace_pipe's own note of events it could not keep
            lost = max(lost, 1)
        if lost:
            self._lose(f"{lost} trace events lost (buffer overrun)", lost)

    def _mark(self, text: bytes) -> None:
        lines, self._tail = split_lines(self._tail, text)
        shift = self._shift         # a partition's requests are the whole disk's
        for offset, length in parse_changes(lines):
            self.dirty.mark(offset - shift, length)

    def _lose(self, why: str, count: int = 1) -> None:
        self.report.lost_events += count
        self._need_compare = True
        log.warning("pair %s: %s: the whole device is compared by block hashes and only "
                    "what differs is sent", self.spec.name, why)

    def _pre_read(self) -> None:
        for ext in self.dirty.take():
            self._journal(ext.offset, self._read(ext.offset, ext.length), True)

    # -- consistency cuts ---------------------------------------------------------------
    def _cut(self) -> bool:
        """Freeze, collect every completed write, journal what is marked, FLUSH, thaw.
        Returns False when the cut was abandoned (no FLUSH)."""
        if self._need_compare:
            return False        # events were lost: no consistency point before a compare
        t0 = time.monotonic()
        done = False
        frozen = self.freezer is not None and self.freezer.freeze()
        try:
            hold = float(os.environ.get("X2X_TEST_FREEZE_HOLD", "0") or 0)
            if hold:            # tests: a freeze that lasts (x2x killed during one)
                time.sleep(hold)
            marker = self.trace.mark(f"x2x-cut-{self.times.cuts}-{time.monotonic_ns()}")
            text, found = self.trace.read_until(marker, self.freeze_cap)
            self._mark(text)
            lost = self.trace.lost()
            if lost or not found:
                self._lose(f"{lost} trace events lost" if lost else
                           "the cut's trace marker did not come back", max(lost, 1))
                return False
            extents = self.dirty.take()
            for n, ext in enumerate(extents):
                if time.monotonic() - t0 > self.freeze_cap:
                    for rest in extents[n:]:
                        self.dirty.mark(rest.offset, rest.length)
                    log.warning("pair %s: cut abandoned after %.2f s frozen (cap %.2f s); "
                                "thawed, the next cut tries again", self.spec.name,
                                time.monotonic() - t0, self.freeze_cap)
                    return False
                self._journal(ext.offset, self._read(ext.offset, ext.length), True)
            seq = self.pub.flush_point()
            now = time.monotonic()
            if now - self._snapshot_at >= SNAPSHOT_EVERY:
                self._snapshot_at = now
                self.resume.snapshot(seq)
            done = True
            return True
        except TraceLost as e:
            self._lose(str(e))
            self.trace.open()
            return False
        finally:
            if frozen:
                self.freezer.thaw()
            self.times.add(time.monotonic() - t0, abandoned=not done)
            if done and self._announce and not self._need_compare:
                # The first consistency point of a full baseline: replay can build
                # targets again (after a journal loss). Waited for after the thaw.
                self._announce = False
                self.pub.drain(120.0)
                announce_baseline(self.settings, self.spec.name, self.state.epoch)

    # -- status -------------------------------------------------------------------------
    def detail(self) -> dict[str, str]:
        d = {"capturer": "trace", "mount": self.freeze or "-",
             "dirty_bytes": str(self.dirty.bytes),
             "lost_events": str(self.report.lost_events),
             "compares": str(self.report.compares), **self.times.detail()}
        if self._phase in ("baseline", "comparing"):
            d[self._phase] = f"{100 * self._pass_done / max(self.vol.size, 1):.0f}%"
        return d

    def beat(self, state: str | None = None) -> None:
        self.pub.beat(state or self._phase, self.detail(), force=True)

    def _close(self) -> None:
        r, t = self.report, self.times
        r.cuts, r.cuts_abandoned = t.cuts, t.abandoned
        r.freeze_p50_ms, r.freeze_p99_ms = t.percentile(50) * 1000, t.percentile(99) * 1000
        r.freeze_max_ms = t.max * 1000
        for part in ("trace", "freezer"):     # the watchdog's exit finds no instance
            obj = getattr(self, part, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception as e:  # noqa: BLE001 - close the rest anyway
                    log.error("pair %s: closing the %s failed: %s", self.spec.name, part, e)
        pub = getattr(self, "pub", None)
        if pub is not None:
            pub.close()
        if getattr(self, "resume", None) is not None:
            self.resume.close()
        self.vol.close()
