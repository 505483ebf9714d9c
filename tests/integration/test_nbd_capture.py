"""The NBD capturer end to end: real NBD clients write to the export, the journal goes
through the real broker, the applier rebuilds the target, and the target equals the
source byte for byte.

Named after the invariants they check (journal/DESIGN.md): the journal order is the
completion order, a baseline never overtakes a write, sync mode never acknowledges an
unjournaled write, a clean stop continues the epoch and an unclean one starts a new one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from consumers.applier import Applier
from infra import control
from infra.reader import read_to_end
from infra.topics import journal_topic
from infra.volume import Volume
from journal.ops import Op, OpKind
from journal.pairs import PairSpec
from nbd.client import Client, parse_uri
from producers.journaling import Mode
from producers.nbd_capture import NBDCapture
from producers.publisher import KEEP_MAX, KEEP_QUEUED, WAITED_LINGER_MS, JournalPublisher
from producers.state import StateStore
from schemas import codec
from tests.conftest import (cached_bytes, free_port, make_image, run_x2x, same_bytes, uncached,
                            x2x_bin)

MiB = 1 << 20
_PACKAGE = {"nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "qemu-io": "qemu-utils",
            "qemu-img": "qemu-utils"}


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (apt-get install {_PACKAGE[binary]})")


def run(*args: str, timeout: float = 120) -> str:
    need(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def make_pair(settings, name: str, tmp_path: Path, size: int, seed: int = 1,
              data_fraction: float = 0.0, block: int = 65536) -> PairSpec:
    src = make_image(tmp_path / "src.img", size, seed=seed, data_fraction=data_fraction)
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    spec = PairSpec(name, str(src), str(dst), block, size)
    control.create_pair(settings, spec)
    return spec


@pytest.fixture
def live(settings, pair_name, tmp_path) -> Iterator[callable]:
    """Start in-process capturers; every one still running is stopped at the end."""
    started: list[NBDCapture] = []

    def start(spec: PairSpec, mode: Mode = Mode.ASYNC) -> NBDCapture:
        cap = NBDCapture(spec, settings, "127.0.0.1", 0, mode).start()
        started.append(cap)
        return cap

    yield start
    for cap in started:
        cap.stop()


def wait_baseline(cap: NBDCapture, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while cap.baseline is not None and not cap.baseline.finished:
        assert time.monotonic() < deadline, "baseline did not finish"
        time.sleep(0.02)


def apply_all(settings, spec: PairSpec) -> None:
    Applier(spec, spec.target, settings).run(until_caught_up=True)


# -- the export and what clients do to it ------------------------------------------------
def test_nbdinfo_sees_the_export(settings, pair_name, tmp_path, live):
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    cap = live(spec)
    info = json.loads(run("nbdinfo", "--json", cap.uri))
    (export,) = info["exports"]
    assert export["export-name"] == pair_name
    assert export["export-size"] == 16 * MiB
    assert export["can_flush"] and export["can_fua"] and export["can_trim"]
    # nbdinfo states the flag for every export; a writable export says false.
    assert export["is_read_only"] is False


def test_qemu_io_patterns_reach_the_target_in_completion_order(settings, pair_name, tmp_path,
                                                                live):
    spec = make_pair(settings, pair_name, tmp_path, 32 * MiB, seed=2, data_fraction=0.5)
    cap = live(spec)
    # Overlapping writes: only the journal order equal to the completion order gives
    # the last pattern on the target.
    run("qemu-io", "-f", "raw",
        "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 1M 1M", "-c", "write -P 0x33 1536k 8k",
        "-c", "write -z 3M 512k", "-c", "discard 20M 2M", "-c", "write -P 0x44 -f 30M 64k",
        "-c", "flush", cap.uri)
    out = run("qemu-io", "-f", "raw", "-r",
              "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 512k",
              "-c", "read -P 0x33 1536k 8k", "-c", "read -P 0x22 1544k 504k",
              "-c", "read -P 0x11 2M 1M", "-c", "read -P 0 3M 512k",
              "-c", "read -P 0x11 3584k 512k", "-c", "read -P 0 20M 2M",
              "-c", "read -P 0x44 30M 64k", cap.uri)
    assert "Pattern verification failed" not in out
    cap.sync_point()
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)
    c = cap.backend.counters
    assert c.ops >= 7 and c.bytes >= 4 * MiB and c.flushes >= 1


def ranges(ops) -> list[tuple[int, int]]:
    """(offset, length) of what ``ops`` cover, adjacent ones joined: however the journal
    split them into records."""
    out: list[list[int]] = []
    for op in sorted(ops, key=lambda op: op.offset):
        if out and out[-1][0] + out[-1][1] == op.offset:
            out[-1][1] += op.length
        else:
            out.append([op.offset, op.length])
    return [tuple(r) for r in out]


def test_one_byte_repeated_as_data_is_journaled_as_zero_and_fill_ops(settings, pair_name,
                                                                    tmp_path, live):
    """A client writing one byte over and over as data (dd from /dev/zero, zerofree, a
    wipe with 0xFF, qemu-io -P) puts ZERO and FILL ops in the journal, not data: zstd
    stores such a run in next to nothing, and an applier's fetch, bounded in stored
    bytes, would decompress thousands of them at once, to gigabytes."""
    spec = make_pair(settings, pair_name, tmp_path, 32 * MiB, seed=5, data_fraction=1.0)
    cap = live(spec)
    wait_baseline(cap)
    first = cap.sync_point() + 1
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(64 * 1024))
    run("qemu-io", "-f", "raw", "-c", "write -P 0 4M 8M", "-c", "write -P 0x5a 12M 64k",
        "-c", "write -P 0 13M 4k", "-c", "write -P 0 20M 6k", "-c", "write -P 0xff 24M 8M",
        "-c", f"write -s {noise} 14M 64k", "-c", "flush", cap.uri)
    last = cap.sync_point()
    ops = [op for e in journal(settings, pair_name) if e.epoch == cap.pub.journaled.epoch
           for seq, op in enumerate(e.ops, e.first_seq) if first <= seq <= last]
    carried = ranges(op for op in ops if op.kind is OpKind.WRITE)
    zeroed = ranges(op for op in ops if op.kind is OpKind.ZERO)
    filled = {value: ranges(op for op in ops if op.kind is OpKind.FILL and op.data == value)
              for value in (b"\x5a", b"\xff")}
    assert carried == [(14 * MiB, 64 * 1024)], carried
    assert zeroed == [(4 * MiB, 8 * MiB), (13 * MiB, 4096), (20 * MiB, 6144)], zeroed
    assert filled == {b"\x5a": [(12 * MiB, 64 * 1024)], b"\xff": [(24 * MiB, 8 * MiB)]}
    # The source holds the bytes as written (allocated), every target the same bytes.
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)
    target = Path(spec.target).read_bytes()
    assert target[4 * MiB:12 * MiB] == bytes(8 * MiB)
    assert target[24 * MiB:] == b"\xff" * (8 * MiB)
    assert target[14 * MiB:14 * MiB + 64 * 1024] == noise.read_bytes()


def test_qemu_img_convert_and_nbdcopy_of_256_mib(settings, pair_name, tmp_path, live):
    size = 256 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size)
    cap = live(spec)
    wait_baseline(cap)
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    for path in (first, second):
        with open(path, "wb") as f:
            for _ in range(size // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(first), cap.uri)
    assert same_bytes(first, spec.source)
    run("nbdcopy", "--flush", str(second), cap.uri)
    assert same_bytes(second, spec.source)
    cap.sync_point()
    apply_all(settings, spec)
    assert same_bytes(second, spec.target)


@pytest.mark.parametrize("mode", [Mode.ASYNC, Mode.FLUSH_SYNC])
def test_multi_conn_a_flush_on_one_connection_covers_every_connection(
        settings, pair_name, tmp_path, live, mode):
    """The export advertises multi-conn; nbdcopy spreads a sparse image over 4
    connections (data and zeroes), then one FLUSH from a fifth connection: in flush-sync
    it returns only once every op of every connection is journaled, in async the FLUSH
    is appended behind all of them. The target rebuilt from the journal is the image."""
    # nbdcopy hands each thread 128 MiB at a time: 512 MiB keeps 4 connections busy
    # (sparse: about 50 MiB of data, the rest zeroed).
    size = 512 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size)
    cap = live(spec, mode)
    wait_baseline(cap)
    cap.sync_point()
    (export,) = json.loads(run("nbdinfo", "--json", cap.uri))["exports"]
    assert export["can_multi_conn"] and export["contexts"] == ["base:allocation"]
    finished = []
    cap.server.on_disconnect = finished.append
    data = make_image(tmp_path / "data.img", size, seed=7, data_fraction=0.1)
    run("nbdcopy", "--connections=4", "--threads=4", str(data), cap.uri)
    deadline = time.monotonic() + 10
    while len(finished) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    writers = [r for r in finished if r.bytes_written]
    # nbdcopy hands its 128 MiB pieces to whichever connection is free, so one may take
    # two (or get only zeroes) when the server is quick: what matters is that several
    # connections wrote before the FLUSH on another one.
    assert len(writers) >= 2, finished
    assert same_bytes(data, spec.source)
    # Block status through the journaling volume: the source's data is the image's.
    extents = json.loads(run("nbdinfo", "--map", "--json", cap.uri))
    # The image's own map, not its st_blocks: those count the extent tree's blocks too
    # once writeback has allocated them (three 4 KiB blocks for this image's extents).
    with Volume(str(data)) as image:
        data_bytes = sum(n for n, hole in image.extents(0, size, 1 << 20) if not hole)
    assert sum(e["length"] for e in extents if e["type"] == 0) == data_bytes
    assert sum(e["length"] for e in extents) == size
    run("qemu-io", "-f", "raw", "-c", "flush", cap.uri)
    flush = cap.pub.appended_seq                        # nothing appended since: its FLUSH
    if mode is Mode.FLUSH_SYNC:
        assert cap.pub.journaled.seq == flush           # every connection's ops with it
    cap.pub.wait_journaled(flush)
    apply_all(settings, spec)
    assert same_bytes(data, spec.target)


@pytest.mark.parametrize("mode", [Mode.ASYNC, Mode.FLUSH_SYNC])
def test_async_backlog_stays_on_the_source_and_flush_waits_as_the_mode_says(
        settings, pair_name, tmp_path, live, mode):
    """A broker that takes nothing: the acknowledged writes wait on the source itself
    (not in memory, not copied to the spool, not holding the client). A client FLUSH
    returns at once in async mode, the journal following with the FLUSH in its place,
    and only once the journal has read and shipped them all in flush-sync (rule 11)."""
    size = 64 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size)
    cap = live(spec, mode)
    wait_baseline(cap)
    cap.sync_point()
    cap.pub.max_inflight = -1                       # stands in for a broker that is full
    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.write(os.urandom(size))
    run("nbdcopy", str(data), cap.uri)              # no flush: acknowledged locally
    deadline = time.monotonic() + 5                 # the last ops close within a linger
    while cap.pub.deferred_bytes < size and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cap.pub.deferred_bytes == size           # every byte of it left on the source
    assert cap.pub.spool.peak == 0 and cap.pub._queued < MiB
    if mode is Mode.FLUSH_SYNC:
        cap.pub.max_inflight = 256 * 1024           # a slow broker from now on
    # async: the broker stays full, so the backlog the FLUSH leaves cannot drain before
    # it is looked at, however long the source's fsync takes.
    run("qemu-io", "-f", "raw", "-c", "flush", cap.uri)
    if mode is Mode.FLUSH_SYNC:
        assert cap.pub.deferred_bytes == 0 and cap.pub.spooled_bytes == 0
        assert cap.pub.journaled.seq == cap.pub.appended_seq   # it waited for it all
        assert len(cap.backend.deferred) == 0
    else:
        assert cap.pub.deferred_bytes > size // 2      # it returned, the journal follows
        flush = cap.pub.appended_seq                   # the FLUSH, behind the data
        cap.pub.max_inflight = 64 * MiB
        assert cap.intent.dirty_blocks() > 0           # kept until the broker has them
        cap.pub.wait_journaled(flush)
        assert cap.pub.deferred_bytes == 0 and len(cap.backend.deferred) == 0
        cap.backend.settle()                           # what the capturer's tick does
        # The FLUSH's point cleared them, or, if a cut's point was open then (a cut
        # after the writes), that one and the point it left owed (journal/DESIGN.md 13).
        deadline = time.monotonic() + 10
        while cap.intent.dirty_blocks():
            assert time.monotonic() < deadline, "the bitmap was never cleared"
            time.sleep(0.05)
    apply_all(settings, spec)
    assert same_bytes(data, spec.target)


def test_overtaken_writes_keep_their_bytes_and_go_to_the_spool_when_memory_is_short(
        settings, pair_name, tmp_path, live):
    """Four writes over the same 8 MiB while the broker takes nothing: each one first
    reads the bytes of the one before (still unjournaled), which then fill memory past
    its bound and go to the disk spool; the journal holds the four in order, each with
    its own bytes, and the target ends with the last."""
    size = 16 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size)
    cap = live(spec)
    wait_baseline(cap)
    first = cap.sync_point() + 1
    cap.pub.max_inflight = -1
    written = cap.backend.counters.bytes
    need("qemu-io")
    # Data, not a pattern: one repeated byte would be journaled as FILL, without bytes.
    versions = [os.urandom(8 * MiB) for _ in range(4)]
    for i, v in enumerate(versions):
        (tmp_path / f"v{i}").write_bytes(v)
    # In the background: qemu-io flushes as it exits, and that waits for the broker.
    client = subprocess.Popen(["qemu-io", "-f", "raw", *[
        c for i in range(4) for c in ("-c", f"write -s {tmp_path / f'v{i}'} 0 8M")],
        cap.uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while cap.backend.counters.bytes < written + 32 * MiB:
        assert time.monotonic() < deadline and client.poll() is None, client.stdout.read()
        time.sleep(0.02)
    assert cap.pub.spool.peak > 8 * MiB             # 24 MiB read early: past the 16 MiB
    cap.pub.max_inflight = 64 * MiB
    assert client.wait(60) == 0, client.stdout.read()
    last = cap.sync_point()
    writes = [op for e in journal(settings, pair_name) if e.epoch == cap.pub.journaled.epoch
              for seq, op in enumerate(e.ops, e.first_seq)
              if first <= seq <= last and op.kind is OpKind.WRITE]
    assert sum(len(op.data) for op in writes) == 4 * 8 * MiB
    by_offset: dict[int, list] = {}
    for op in writes:                               # journal order, per offset
        by_offset.setdefault(op.offset, []).append(op.data)
    for offset, datas in by_offset.items():
        order = [[i for i, v in enumerate(versions) if v[offset:offset + len(d)] == d]
                 for d in datas]
        assert order == [[0], [1], [2], [3]], f"offset {offset}: {order}"
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)


def test_a_held_burst_ships_once_the_clients_go_quiet(settings, pair_name, tmp_path, live):
    """Burst absorption: with the hold far away, writes still reach the broker as soon as
    the clients stop writing, without a FLUSH."""
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    cap = live(spec)
    wait_baseline(cap)
    cap.sync_point()
    cap.pub.hold = 3600.0
    burst = tmp_path / "burst"
    burst.write_bytes(os.urandom(12 * MiB))     # data: a pattern would be a FILL op
    run("qemu-io", "-f", "raw", "-c", f"write -s {burst} 0 12M", cap.uri)
    deadline = time.monotonic() + 30
    while cap.pub.journaled.seq < cap.pub.appended_seq:
        assert time.monotonic() < deadline, "a quiet source's held writes were never sent"
        time.sleep(0.05)
    assert cap.pub.deferred_bytes == 0


def test_an_async_flush_ships_what_precedes_it_while_clients_keep_writing(
        settings, pair_name, tmp_path, live):
    """Burst absorption is for clients that write without flushing: their writes stay on
    the source while they keep writing. A database commits (FLUSHes) while it keeps
    writing: its FLUSH returns once the source is durable and does not wait for the
    broker, but nothing before it stays held; and having flushed within the hold, it is
    not bursting: its later writes ship as they come, without waiting for its next FLUSH,
    so its RPO is the journal's lag, not the time between its FLUSHes."""
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    cap = live(spec)
    wait_baseline(cap)
    cap.sync_point()
    cap.pub.hold = 3600.0
    cap.pub.busy = lambda: True                 # clients writing all the time
    burst, committed, later = (os.urandom(4 * MiB) for _ in range(3))
    client = Client.open(parse_uri(cap.uri))
    try:
        client.pwrite(12 * MiB, burst)          # no FLUSH yet: a burst, held
        time.sleep(1.5)
        assert cap.pub.journaled.seq < cap.pub.appended_seq
        assert cap.pub.deferred_bytes > 0       # left on the source
        client.pwrite(0, committed)
        client.flush()
        flush_seq = cap.pub.appended_seq
        deadline = time.monotonic() + 30
        while cap.pub.journaled.seq < flush_seq:
            assert time.monotonic() < deadline, "a client FLUSH left its writes held"
            time.sleep(0.05)
        client.pwrite(8 * MiB, later)           # no FLUSH after it, clients still busy
        deadline = time.monotonic() + 30
        while cap.pub.journaled.seq < cap.pub.appended_seq or cap.pub.deferred_bytes:
            assert time.monotonic() < deadline, (
                "writes after a client's FLUSH were held until its next one")
            time.sleep(0.05)
    finally:
        client.close()
    cap.sync_point()
    apply_all(settings, spec)
    target = Path(spec.target).read_bytes()
    assert target[:4 * MiB] == committed and target[8 * MiB:12 * MiB] == later
    assert target[12 * MiB:] == burst


def test_a_flushing_clients_small_writes_carry_their_own_bytes(settings, pair_name,
                                                                tmp_path, live):
    """A database rewrites its WAL page at every commit. Once its client has flushed, a
    small write travels in memory (JournalPublisher.keeps): nothing of it waits on the
    source, so nothing is read back before the next overwrite; each commit's op carries
    the bytes that commit wrote, in order, while the broker takes nothing yet. A write
    above KEEP_MAX and a client that has not flushed within the hold still leave their
    bytes on the source, and memory holds no more than KEEP_QUEUED of them."""
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    cap = live(spec)
    wait_baseline(cap)
    first = cap.sync_point() + 1
    cap.pub.max_inflight = -1                   # the broker takes nothing for now
    pages = [os.urandom(8192) for _ in range(40)]
    large = os.urandom(KEEP_MAX + 4096)
    client = Client.open(parse_uri(cap.uri))
    try:
        # Promises filed to read the source later (cap.backend.deferred): one per write
        # left there, until it is read (at its turn, or before an overwrite).
        client.pwrite(MiB, pages[0])            # not flushed yet: left on the source
        assert len(cap.backend.deferred) == 1
        client.flush()
        for page in pages[1:]:                  # commits: the same page, then a FLUSH
            client.pwrite(MiB, page)            # the first reads pages[0] back, once
            client.flush()
        assert len(cap.backend.deferred) == 0
        client.pwrite(4 * MiB, large)
        assert len(cap.backend.deferred) >= 1
        client.flush()
        # Commits of KEEP_MAX bytes while nothing ships: memory never holds more than
        # KEEP_QUEUED (and one open entry); the rest waits on the source or in the spool.
        many = os.urandom(100 * KEEP_MAX)
        for i in range(100):
            client.pwrite(8 * MiB + i * KEEP_MAX, many[i * KEEP_MAX:(i + 1) * KEEP_MAX])
            client.flush()
            assert cap.pub._queued <= KEEP_QUEUED + KEEP_MAX
    finally:
        client.close()
    cap.pub.max_inflight = 64 * MiB
    cap.sync_point()
    ops = [op for entry in journal(settings, spec.name) if entry.first_seq >= first
           for op in entry.ops if op.kind is OpKind.WRITE]
    assert [bytes(op.data) for op in ops if op.offset == MiB] == pages
    assert b"".join(bytes(op.data) for op in ops if 4 * MiB <= op.offset < 8 * MiB) == large
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)


def test_a_stream_of_flushes_is_checkpointed_once_per_interval(settings, pair_name,
                                                              tmp_path, live):
    """A database commits hundreds of times a second, each commit a FLUSH. A following
    applier checkpoints at most once per checkpoint interval, at the newest point it has
    read; a point after a quiet spell at once, and the last one without waiting for more
    records. With interval 0 an applier checkpoints at every record that ends at a point."""
    spec = make_pair(settings, pair_name, tmp_path, 4 * MiB)
    cap = live(spec, Mode.FLUSH_SYNC)          # each FLUSH journaled before its reply
    wait_baseline(cap)
    cap.sync_point()
    stop = threading.Event()
    applier = Applier(spec, spec.target, settings, checkpoint_interval=0.5)
    follower = threading.Thread(target=applier.run, kwargs={"stop": stop})
    follower.start()
    client = Client.open(parse_uri(cap.uri))
    try:
        deadline = time.monotonic() + 60
        while applier.checkpointed.seq < cap.pub.appended_seq:   # the baseline's point
            assert time.monotonic() < deadline, "the applier never reached the baseline"
            time.sleep(0.02)
        before, t0 = applier.stats.checkpoints, time.monotonic()
        for i in range(60):
            client.pwrite(i * 65536, os.urandom(8192))
            client.flush()
        last = cap.pub.appended_seq
        while applier.checkpointed.seq < last:
            assert time.monotonic() < deadline, "the last point was never checkpointed"
            time.sleep(0.02)
        took = time.monotonic() - t0
    finally:
        client.close()
        stop.set()
        follower.join(30)
    points = [e for e in journal(settings, pair_name)
              if e.closes_consistency_point and e.last_seq > cap.pub.appended_seq - 120]
    assert len(points) >= 60                    # every FLUSH a record of its own
    made = applier.stats.checkpoints - before
    assert 1 <= made <= took / 0.5 + 2, (made, took)
    assert same_bytes(spec.source, spec.target)
    # The same journal applied anew with interval 0: a checkpoint at every point.
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4 * MiB))
    stats = Applier(spec, str(other), settings, checkpoint_interval=0,
                    publish_status=False).run(until_caught_up=True)
    assert stats.checkpoints >= len(points) > made
    assert same_bytes(spec.source, other)


def test_capture_with_a_bad_async_hold_is_refused_before_it_serves(settings, pair_name,
                                                                    tmp_path):
    spec = make_pair(settings, pair_name, tmp_path, 4 * MiB)
    proc = run_x2x("capture", pair_name, "--nbd", str(free_port()), check=False, timeout=60,
                   env={"X2X_ASYNC_HOLD": "soon"})
    assert proc.returncode != 0
    assert "X2X_ASYNC_HOLD='soon' is invalid: give seconds" in proc.stdout + proc.stderr
    assert journal(settings, pair_name) == []        # nothing journaled, nothing served
    assert StateStore(spec.name).load() == (None, None)


def test_spool_off_still_replicates(settings, pair_name, tmp_path, live, monkeypatch):
    monkeypatch.setenv("X2X_SPOOL_MAX", "0")
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    cap = live(spec)
    assert cap.pub.spool is None
    wait_baseline(cap)
    cap.pub.max_inflight = 256 * 1024
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 12M", "-c", "flush", cap.uri)
    # An async FLUSH is answered once the source holds the data, not the broker: the
    # last records may still be in flight when qemu-io exits.
    cap.sync_point()
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)


def test_baseline_never_overtakes_a_write(settings, pair_name, tmp_path, live):
    """Clients write all over a pre-filled source while its baseline is being published;
    the target must end with the clients' data, not the baseline's older reads."""
    size = 192 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size, seed=9, data_fraction=1.0)
    cap = live(spec)
    rng = random.Random(5)
    cmds: list[str] = []
    for i in range(400):
        off = rng.randrange(size // 4096 - 64) * 4096
        cmds += ["-c", f"write -P {i % 250 + 1} {off} {rng.choice([4096, 65536, 262144])}"]
    assert cap.baseline is not None
    at_start = cap.baseline.done
    run("qemu-io", "-f", "raw", *cmds, cap.uri)
    at_end = cap.baseline.done
    assert at_start < size, "the baseline finished before the clients began; grow the volume"
    wait_baseline(cap)
    cap.sync_point()
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)
    # Report how much the writes overlapped the baseline (visible with -s on failure).
    print(f"baseline at {at_start / size:.0%} when writes began, {at_end / size:.0%} at end")


def test_baseline_ends_with_a_flush_and_the_hash_map_is_saved(settings, pair_name, tmp_path,
                                                              live):
    from journal.blocks import HASH_LEN, hash_buffer
    spec = make_pair(settings, pair_name, tmp_path, 8 * MiB, seed=4, data_fraction=0.5)
    uncached(spec.source)
    cap = live(spec)
    wait_baseline(cap)
    # The baseline read the whole source and left none of it in the page cache.
    assert cached_bytes(spec.source) == 0
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 100k 300k", cap.uri)
    report = cap.stop()
    assert report.clean and report.baseline_finished
    state, hashes = StateStore(spec.name).load()
    assert state.clean and state.epoch == 1 and state.next_seq == report.last_seq + 1
    expected = b"".join(hash_buffer(memoryview(Path(spec.source).read_bytes()), 65536))
    assert hashes == expected and len(hashes) == 128 * HASH_LEN
    kinds = [op.kind for e in journal(settings, spec.name) for op in e.ops]
    assert kinds[cap.baseline.flush_seq - 1] is OpKind.FLUSH and kinds[-1] is OpKind.FLUSH


# -- service lifecycle: real processes, real signals -------------------------------------
class Capturer:
    """``x2x capture NAME --nbd`` as a child process, as an operator runs it."""

    def __init__(self, name: str, port: int | Path, *extra: str) -> None:
        """``port`` on 127.0.0.1, or a unix socket's path."""
        where = str(port) if isinstance(port, Path) else f"127.0.0.1:{port}"
        self.proc = subprocess.Popen([x2x_bin(), "capture", name, "--nbd", where, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.uri = (f"nbd+unix:///{name}?socket={port}" if isinstance(port, Path)
                    else f"nbd://127.0.0.1:{port}/{name}")
        self.banner = self.proc.stdout.readline()
        assert "serving" in self.banner, self.banner + self.proc.stderr.read()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        return out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def baseline_journaled(beat) -> bool:
    """The baseline is done and the broker holds all of it: "done" is announced once
    its last records are queued, and the write-intent bitmap it set is cleared only
    when the broker acknowledges them (a capturer killed in between resends it all)."""
    return beat.detail.get("baseline") == "done" and beat.detail.get("dirty_bytes") == "0"


def wait_beat(settings, name: str, cond, timeout: float = 60) -> dict[str, str]:
    """Wait until the newest capturer heartbeat of ``name`` satisfies ``cond(beat)``."""
    from infra.heartbeat import read_beats
    deadline = time.monotonic() + timeout
    while True:
        beats = [b for b in read_beats(settings) if b.pair == name and b.role == "capturer"]
        newest = max(beats, key=lambda b: b.at_ms) if beats else None
        if newest is not None and cond(newest):
            return newest.detail
        assert time.monotonic() < deadline, f"no capturer heartbeat of {name} as expected"
        time.sleep(0.3)


def journal(settings, name: str) -> list:
    return [codec.decode_entry(m.value()) for m in read_to_end(settings, journal_topic(name))]


def test_completions_one_acknowledgement_decides_are_followed_by_their_then_once(
        settings, pair_name, tmp_path):
    """Sync capture's writes wait for the broker without a thread each
    (JournalPublisher.when_journaled): the calls one acknowledgement decides run, then
    their shared ``then`` once, after them all (an NBD connection sends their replies in
    one send), even when one of them fails; after the close, a late call is failed at
    once and its ``then`` still runs (a reply held for it would otherwise never go)."""
    spec = make_pair(settings, pair_name, tmp_path, 4 * MiB)
    pub = JournalPublisher(settings, spec.name, 1, linger_ms=WAITED_LINGER_MS)
    events: list[str] = []
    done = threading.Event()

    def call(name: str, broken: bool = False):
        def completion(failed: str | None) -> None:
            events.append(f"{name}: {'journaled' if failed is None else 'failed'}")
            if broken:
                raise RuntimeError("a completion that breaks")
        return completion

    def then() -> None:
        events.append("then")
        done.set()
    try:
        # Registered before the op they wait for exists: one acknowledgement decides all.
        seq = pub.appended_seq + 1
        for name, broken in (("a", False), ("b", True), ("c", False)):
            pub.when_journaled(seq, call(name, broken), then)
        pub.append_many([Op.write(0, b"\x07" * 4096)], client=True)
        assert done.wait(30), f"no then after the acknowledgement: {events}"
        time.sleep(0.2)         # a second 'then' would come now
        assert events == ["a: journaled", "b: journaled", "c: journaled", "then"]
    finally:
        pub.close()
    events.clear()
    pub.when_journaled(seq + 1, call("late"), then)
    assert events == ["late: failed", "then"]


def test_records_reach_the_journal_in_seq_order_whichever_thread_sends_them(
        settings, pair_name, tmp_path):
    """A record someone waits for may be sent by the thread that appended its ops
    (``ship``, as an NBD reader does before it waits), by the poller as the previous
    record's acknowledgement comes, or by the writer (entries a full payload budget
    closed; a wait without ``ship``): whichever, the journal holds every op once, in seq
    order, and every completion learns it."""
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    pub = JournalPublisher(settings, spec.name, 1, linger_ms=WAITED_LINGER_MS)
    calls: list[str | None] = []
    senders: set[str] = set()
    send = pub._send_waited

    def sending(entry, held: int) -> None:  # who sends what ``ship`` and the poller take
        senders.add(threading.current_thread().name)
        send(entry, held)
    pub._send_waited = sending      # type: ignore[method-assign]

    def client(k: int) -> None:
        rng = random.Random(k)
        for i in range(150):
            block = rng.randrange(2048)
            if i % 37 == 36:            # a large write: its entries close on the budget
                pub.append_many([Op.write(block * 4096, bytes([k]) * MiB)])
                pub.wait_journaled(pub.appended_seq)
                continue
            answered = threading.Event()

            def completion(failed: str | None) -> None:
                calls.append(failed)
                answered.set()
            seq = pub.append_at(Op.write(block * 4096, bytes([k]) * 4096))
            pub.when_journaled(seq, completion, ship=False)
            if i % 10 != 9:             # else the writer finds it (within 0.1 s)
                pub.ship()
            assert answered.wait(30), f"write {i} of client {k} never answered"

    threads = [threading.Thread(target=client, args=(k,), name=f"client-{k}")
               for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        pub.drain()
    finally:
        pub.close()
    entries = journal(settings, spec.name)
    seqs = [seq for e in entries for seq in range(e.first_seq, e.last_seq + 1)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert sum(op.kind is OpKind.WRITE for e in entries for op in e.ops) >= 4 * 150
    assert len(calls) == 4 * (150 - 150 // 37) and set(calls) == {None}
    assert "x2x-publisher" in senders and any(n.startswith("client-") for n in senders)


def test_sync_mode_answers_many_writes_in_flight(settings, pair_name, tmp_path, live):
    """Writes without FUA, 16 in flight (qemu-img bench with the host cache off): in sync
    mode their replies are held until the acknowledgement of their record and go out
    together then. Every write is answered (the client would otherwise wait for ever),
    journaled, and the target ends equal to the source."""
    size = 16 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size)
    cap = live(spec, Mode.SYNC)
    wait_baseline(cap)
    before = cap.pub.journaled.seq
    # 257 blocks apart: 3,000 different aligned blocks of the 4,096 (257 is odd).
    run("qemu-img", "bench", "-w", "-t", "none", "-f", "raw", "-s", "4096",
        "-S", str(257 * 4096), "-c", "3000", "-d", "16", "--pattern", "0x5a",
        "--flush-interval", "3000", cap.uri, timeout=60)
    # Sync mode: journaled before each was answered, nothing left to wait for.
    assert cap.pub.journaled.seq - before >= 3000
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)
    data = Path(spec.source).read_bytes()
    written = sum(data[i:i + 4096] == b"\x5a" * 4096 for i in range(0, size, 4096))
    assert written == 3000


def test_sync_mode_keeps_every_acknowledged_write_through_sigkill(settings, pair_name,
                                                                  tmp_path):
    need("qemu-io")
    size = 32 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size, seed=3, data_fraction=0.3)
    cap = Capturer(pair_name, free_port(), "--mode", "sync")
    writer = None
    try:
        # Writes, then a long pause with the connection open: no FLUSH follows them, so
        # only sync mode puts them in the journal before the acknowledgement.
        writes = [(i * 256 * 1024 + 4096 * (i % 7), 8192 * (1 + i % 4), 0x10 + i)
                  for i in range(60)]
        cmds = [a for off, ln, pat in writes for a in ("-c", f"write -P {pat} {off} {ln}")]
        writer = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", *cmds,
                                   "-c", "sleep 30000", cap.uri],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        acked = 0
        while acked < len(writes):
            line = writer.stdout.readline()
            assert line, writer.stderr.read()
            acked += line.startswith("wrote ")
        cap.proc.kill()                       # SIGKILL: no clean stop, no final FLUSH
        cap.proc.wait(10)
    finally:
        cap.kill()
        if writer is not None:
            writer.kill()
            writer.wait(10)
    # Every acknowledged write is in the journal: replay all of it onto a blank image.
    replay = bytearray(size)
    for entry in journal(settings, pair_name):
        for op in entry.ops:
            if op.kind is OpKind.WRITE:
                replay[op.offset:op.offset + op.length] = op.data
            elif op.kind in (OpKind.ZERO, OpKind.TRIM):
                replay[op.offset:op.offset + op.length] = bytes(op.length)
            elif op.kind is OpKind.FILL:        # what these writes are journaled as
                replay[op.offset:op.offset + op.length] = op.data * op.length
    for off, ln, pat in writes:
        assert replay[off:off + ln] == bytes([pat]) * ln, f"acknowledged write at {off} lost"
    state, _ = StateStore(pair_name).load()
    assert not state.clean
    # The unclean stop is found at the next start: a new epoch resending the blocks the
    # write-intent bitmap marks (the writes since the last FLUSH), not a full baseline.
    again = Capturer(pair_name, free_port())
    try:
        assert "epoch 2 from seq 1 (new epoch, resending" in again.banner, again.banner
        wait_beat(settings, pair_name,
                  lambda b: b.epoch == 2 and b.detail.get("resend") == "done")
        out, _ = again.stop()
        assert "stopped (clean)" in out
    finally:
        again.kill()
    run_x2x("apply", pair_name, "--until-caught-up")
    assert same_bytes(spec.source, spec.target)


def test_sigterm_is_a_clean_stop_and_restart_continues_the_epoch(settings, pair_name,
                                                                 tmp_path):
    need("qemu-io")
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB, seed=6, data_fraction=0.5)
    port = free_port()
    cap = Capturer(pair_name, port)
    try:
        assert "epoch 1 from seq 1 (new epoch, baseline running)" in cap.banner
        wait_beat(settings, pair_name, lambda b: b.detail.get("baseline") == "done")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 1M", cap.uri)
        out, _ = cap.stop()
    finally:
        cap.kill()
    assert cap.proc.returncode == 0 and "stopped (clean)" in out
    state, _ = StateStore(pair_name).load()
    assert state.clean and state.epoch == 1
    cap = Capturer(pair_name, port)
    try:
        assert f"epoch 1 from seq {state.next_seq} (same epoch)" in cap.banner
        run("qemu-io", "-f", "raw", "-c", "write -P 0x62 2M 1M", "-c", "discard 4M 1M",
            cap.uri)
        status = json.loads(run_x2x("status", pair_name, "--json").stdout)
        out, _ = cap.stop(signal.SIGINT)
    finally:
        cap.kill()
    assert "stopped (clean)" in out
    assert {e.epoch for e in journal(settings, pair_name)} == {1}
    run_x2x("apply", pair_name, "--until-caught-up")
    assert same_bytes(spec.source, spec.target)
    detail = status[0]["capture_detail"]
    assert detail["capturer"] == "nbd" and detail["mode"] == "async"
    assert {"clients", "captured_ops", "captured_bytes"} <= set(detail)


def test_a_capture_on_a_unix_socket_journals_and_leaves_no_socket_behind(settings, pair_name,
                                                                        tmp_path):
    import stat
    need("qemu-io")
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB, seed=7, data_fraction=0.5)
    sock = tmp_path / "capture.sock"
    cap = Capturer(pair_name, sock)
    try:
        assert cap.uri in cap.banner
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        run("qemu-io", "-f", "raw", "-c", "write -P 0x63 1M 1M", "-c", "flush", cap.uri)
        status = json.loads(run_x2x("status", pair_name, "--json").stdout)
        assert status[0]["capture_detail"]["listen"] == cap.uri
        cap.kill()                      # SIGKILL: the socket file stays behind
    finally:
        cap.kill()
    assert sock.exists()
    cap = Capturer(pair_name, sock)     # ... and the next start takes its place
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x64 3M 1M", cap.uri)
        out, _ = cap.stop()
    finally:
        cap.kill()
    assert "stopped (clean)" in out and not sock.exists()
    run_x2x("apply", pair_name, "--until-caught-up")
    assert same_bytes(spec.source, spec.target)
    target = Path(spec.target).read_bytes()
    assert target[MiB:2 * MiB] == b"\x63" * MiB and target[3 * MiB:4 * MiB] == b"\x64" * MiB


def test_cli_bad_input(settings, pair_name, tmp_path):
    make_pair(settings, pair_name, tmp_path, MiB)
    cases = [
        (["--nbd", "10809", "--once"], "--once and --interval belong to the scan capturer"),
        (["--nbd", "10809", "--interval", "5"], "--once and --interval belong"),
        (["--mode", "sync"], "--mode, --cut-interval, --tls and --on-fence only apply to the NBD"),
        (["--cut-interval", "2"], "--tls and --on-fence only apply to the NBD"),
        (["--on-fence", "true"], "--tls and --on-fence only apply to the NBD"),
        (["--nbd", "10809", "--cut-interval", "-1"], "--cut-interval must be seconds"),
        (["--nbd", "99999"], "--nbd '99999' is invalid"),
        (["--nbd", "host:port"], "use [HOST:]PORT"),
        (["--nbd", "10809", "--mode", "fast"], "--mode 'fast' is invalid"),
    ]
    for args, message in cases:
        proc = run_x2x("capture", pair_name, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    with socketserver_on() as port:
        proc = run_x2x("capture", pair_name, "--nbd", f"127.0.0.1:{port}", check=False)
        assert proc.returncode == 2 and "cannot listen for NBD" in proc.stderr
    # A file where the unix socket should go is nobody's to remove.
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    proc = run_x2x("capture", pair_name, "--nbd", str(taken), check=False)
    assert proc.returncode == 2 and f"cannot listen for NBD on {taken}" in proc.stderr \
        and "not a socket is there" in proc.stderr, proc.stderr
    assert taken.read_text() == "keep me"
    proc = run_x2x("capture", pair_name, "--nbd", str(tmp_path / "no-such-dir" / "s.sock"),
                   check=False)
    assert proc.returncode == 2 and "cannot listen for NBD" in proc.stderr, proc.stderr
    # A refused start leaves the pair's state alone (no new epoch for nothing).
    assert StateStore(pair_name).load() == (None, None)


class socketserver_on:
    """A port somebody else listens on."""

    def __enter__(self) -> int:
        import socket
        self.sock = socket.create_server(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()



def test_resync_goes_through_the_nbd_capturer_that_serves_the_source(settings, pair_name,
                                                                      tmp_path, live):
    """The capturer keeps serving: it journals the hashes and the resends in its own
    epoch, and the target ends equal to the source having received only what differed."""
    spec = make_pair(settings, pair_name, tmp_path, 4 * MiB, data_fraction=0.25)
    cap = live(spec)
    wait_baseline(cap)
    cap.sync_point()
    epoch = cap.pub.journaled.epoch
    run_x2x("apply", pair_name, "--until-caught-up")
    # Two blocks change after the target's last apply: only they may travel.
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x77 {MiB} 128k", cap.uri],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(run_x2x("pair", "resync", pair_name, "--json").stdout)
    assert (out["blocks"], out["differing"]) == (64, 2), out
    assert out["resent_bytes"] == 2 * 65536 and out["epoch"] == epoch, out
    assert cap.pub.journaled.epoch == epoch           # no new epoch: the live one served it
    assert same_bytes(spec.source, spec.target)


def test_a_pair_created_again_under_the_same_name_starts_afresh(settings, pair_name,
                                                                  tmp_path, live):
    """The saved state of a deleted pair must not be taken for this one's (its journal is
    a new topic, not a lost one): a full baseline in epoch 1, and no needs-resync."""
    spec = make_pair(settings, pair_name, tmp_path, 2 * MiB, data_fraction=0.5)
    cap = live(spec)
    wait_baseline(cap)
    assert cap.stop().clean
    control.delete_pair(settings, pair_name)
    time.sleep(0.01)                                  # another creation time
    control.create_pair(settings, spec)
    cap = live(spec)
    assert (cap.report.epoch, cap.report.new_epoch, cap.report.journal_lost) == (1, True, False)
    assert cap.baseline is not None
    wait_baseline(cap)
    assert cap.stop().clean
    assert control.get_pair(settings, pair_name).state == "created"
    apply_all(settings, spec)
    assert same_bytes(spec.source, spec.target)
