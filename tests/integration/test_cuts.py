"""Consistency points without client FLUSHes (journal/DESIGN.md rule 16), and lag and
RPO from the client's point of view (rule 8).

Real NBD clients that never flush write to the export of an async NBD capturer while an
applier follows: the target converges to the source, byte for byte, within a few cut
intervals, the capturer having cut on its own. While the journal cannot take a burst,
``x2x status`` shows it as lag with a non-zero RPO, and the burst's bytes as not
journaled. Targets are polled with a timeout; nothing asserts on a duration.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from consumers.applier import Applier
from journal.pairs import PairSpec
from producers.nbd_capture import CUT_INTERVAL, NBDCapture
from tests.conftest import run_x2x, same_bytes
from tests.e2e.test_ext4_nbd import _requirements, fuse_file, quietly, sh
from tests.integration.test_nbd_capture import live, make_pair, need, run, wait_baseline  # noqa: F401

MiB = 1 << 20
CONVERGE_S = 60


@pytest.fixture
def following(settings) -> Iterator[Callable[[PairSpec], Applier]]:
    """An applier following a pair's journal in a thread, as ``x2x apply`` does."""
    running: list[tuple[threading.Thread, threading.Event]] = []

    def follow(spec: PairSpec) -> Applier:
        applier = Applier(spec, spec.target, settings)
        stop = threading.Event()
        t = threading.Thread(target=applier.run, kwargs={"stop": stop}, daemon=True)
        t.start()
        running.append((t, stop))
        return applier

    yield follow
    for t, stop in running:
        stop.set()
        t.join(30)


def converged(spec: PairSpec, timeout: float = CONVERGE_S) -> None:
    """Wait until the target equals the source (their whole volumes)."""
    deadline = time.monotonic() + timeout
    while not same_bytes(spec.source, spec.target):
        assert time.monotonic() < deadline, "the target never converged to the source"
        time.sleep(0.25)


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def started(live, spec: PairSpec) -> NBDCapture:
    cap = live(spec)
    wait_baseline(cap)
    cap.sync_point()
    return cap


# -- the target follows clients that never flush ------------------------------------------
def test_nbdcopy_without_flush_reaches_the_target(settings, pair_name, tmp_path, live,
                                                  following):
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    cap = started(live, spec)
    following(spec)
    flushes = cap.backend.counters.flushes
    data = random_file(tmp_path / "data.img", 16 * MiB)
    run("nbdcopy", str(data), cap.uri)              # no --flush: no FLUSH at all
    assert same_bytes(data, spec.source)
    converged(spec)                                 # the capturer stays up, unflushed
    assert cap.backend.counters.flushes == flushes  # no client FLUSH came
    assert cap.backend.counters.cuts >= 1


def test_qemu_io_writes_without_flush_reach_the_target(settings, pair_name, tmp_path, live,
                                                       following):
    need("qemu-io")
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB, seed=4, data_fraction=0.5)
    cap = started(live, spec)
    following(spec)
    flushes = cap.backend.counters.flushes
    # qemu-io flushes as it exits: it sleeps with the connection open instead.
    writes = ["write -P 0x31 0 3M", "write -P 0x32 1M 64k", "write -z 5M 1M",
              "discard 8M 2M", "write -P 0x33 12M 2M"]
    client = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw",
                               *[a for w in writes for a in ("-c", w)],
                               "-c", "sleep 600000", cap.uri],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        done = 0
        while done < len(writes):
            line = client.stdout.readline()
            assert line, client.stderr.read()
            done += line.startswith(("wrote ", "discard "))
        converged(spec)
        assert client.poll() is None                # still connected, never flushed
        assert cap.backend.counters.flushes == flushes
    finally:
        client.kill()
        client.wait(10)


def settled_flushes(cap, quiet: float = 1.0, timeout: float = 15.0) -> int:
    """The capturer's FLUSH count once it has not moved for ``quiet`` seconds: losetup
    closing the nbdfuse file flushes it, and that FLUSH may reach the server a moment
    after losetup returned (a CI run counted it during the dd)."""
    deadline = time.monotonic() + timeout
    count, since = cap.backend.counters.flushes, time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        if cap.backend.counters.flushes != count:
            count, since = cap.backend.counters.flushes, time.monotonic()
    return count


@pytest.mark.root
def test_dd_direct_through_a_loop_device_without_fsync_reaches_the_target(
        settings, pair_name, tmp_path, live, following):
    """The kernel's block layer as the client: nbdfuse -> loop device -> dd
    oflag=direct, no fsync (a page-cache-less writer that never flushes)."""
    _requirements()
    spec = make_pair(settings, pair_name, tmp_path, 32 * MiB)
    cap = started(live, spec)
    following(spec)
    data = random_file(tmp_path / "data.img", 8 * MiB)
    with fuse_file(cap.uri, tmp_path) as disk:
        loop = sh("losetup", "--find", "--show", str(disk)).strip()
        # The last close of a block device flushes it: this one stays open meanwhile.
        held = os.open(loop, os.O_RDONLY)
        try:
            flushes = settled_flushes(cap)  # (setting the loop device up may)
            sh("dd", f"if={data}", f"of={loop}", "bs=1M", "seek=4", "oflag=direct",
               "status=none")
            converged(spec)
            with open(spec.target, "rb") as f:
                f.seek(4 * MiB)
                assert f.read(8 * MiB) == data.read_bytes()
            assert cap.backend.counters.flushes == flushes
            assert cap.backend.counters.cuts >= 1
        finally:
            os.close(held)
            quietly("losetup", "-d", loop)


def test_a_cut_clears_the_write_intent_bitmap_only_once_the_broker_has_it(
        settings, pair_name, tmp_path, live):
    """Like an async FLUSH's point, a cut's point clears the blocks written before it only
    once its FLUSH is journaled: while the broker takes nothing they stay marked (a crash
    resends them), and once it has them they clear with no client FLUSH at all."""
    spec = make_pair(settings, pair_name, tmp_path, 16 * MiB)
    cap = started(live, spec)
    deadline = time.monotonic() + CONVERGE_S
    while cap.intent.dirty_blocks():            # the baseline's point ends
        assert time.monotonic() < deadline, "the baseline's blocks never cleared"
        time.sleep(0.1)
    cap.pub.max_inflight = -1                   # stands in for a broker that is full
    cuts = cap.backend.counters.cuts
    # No cut between the last write and reading its seq (the tick cuts every 50 ms once
    # the last point is a second old): cuts resume once the writes' seq is known.
    cap.cut_interval = 0
    run("nbdcopy", str(random_file(tmp_path / "data.img", 8 * MiB)), cap.uri)
    written = cap.pub.appended_seq
    cap.cut_interval = CUT_INTERVAL
    deadline = time.monotonic() + CONVERGE_S
    while cap.pub.cut_due(0) or cap.backend.counters.cuts == cuts:
        assert time.monotonic() < deadline, "the capturer never cut after the writes"
        time.sleep(0.1)
    assert cap.pub.appended_seq > written       # the cut's FLUSH, behind the writes
    time.sleep(0.5)                             # ticks settle meanwhile: nothing to end
    assert cap.intent.dirty_blocks() == 8 * MiB // spec.block_size
    assert cap.pub.journaled.seq < written
    cap.pub.max_inflight = 64 * MiB             # the broker takes it again
    deadline = time.monotonic() + CONVERGE_S
    while cap.intent.dirty_blocks():
        assert time.monotonic() < deadline, "the cut's point never cleared the bitmap"
        time.sleep(0.1)
    assert cap.backend.counters.flushes == 0


def test_no_cut_interval_leaves_the_target_at_the_last_client_flush(settings, pair_name,
                                                                    tmp_path, following):
    """--cut-interval 0: the former behaviour, only client FLUSHes are consistency
    points (the applier stages the unflushed writes until one comes)."""
    spec = make_pair(settings, pair_name, tmp_path, 8 * MiB)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0, cut_interval=0).start()
    try:
        wait_baseline(cap)
        cap.sync_point()
        applier = following(spec)
        run("nbdcopy", str(random_file(tmp_path / "data.img", 4 * MiB)), cap.uri)
        deadline = time.monotonic() + CONVERGE_S
        while applier.read_position.seq < cap.pub.appended_seq:
            assert time.monotonic() < deadline, "the applier did not read the writes"
            time.sleep(0.1)
        assert applier.checkpointed.seq < cap.pub.appended_seq   # staged, not applied
        assert cap.backend.counters.cuts == 0
        run("qemu-io", "-f", "raw", "-c", "flush", cap.uri)       # a client FLUSH
        converged(spec)
    finally:
        cap.stop()


# -- lag and RPO count what the journal does not hold yet -----------------------------------
def test_status_counts_a_held_burst_as_lag_with_a_non_zero_rpo(settings, pair_name,
                                                               tmp_path, live, following):
    spec = make_pair(settings, pair_name, tmp_path, 32 * MiB)
    cap = started(live, spec)
    following(spec)
    cap.pub.max_inflight = -1                       # stands in for a broker that is full
    burst = 16 * MiB
    run("nbdcopy", str(random_file(tmp_path / "data.img", burst)), cap.uri)
    deadline = time.monotonic() + CONVERGE_S
    while True:                                     # beats come in their own time: poll
        (st,) = json.loads(run_x2x("status", pair_name, "--json").stdout)
        (rep,) = st["replicas"] or [None]
        detail = st["capture_detail"]
        # (An applier's first beat may come before its first checkpoint: the target
        # lacks the whole epoch, since a time no beat says, and the RPO is unknown.)
        if (rep and rep["applied_seq"] and rep["lag_bytes"] and rep["lag_bytes"] >= burst
                and int(detail.get("unjournaled_bytes", 0)) >= burst):
            break
        assert time.monotonic() < deadline, f"the held burst never showed as lag: {st}"
        time.sleep(0.5)
    assert rep["lag_ops"] >= burst // cap.pub.max_op_data
    assert rep["rpo_s"] > 0
    assert int(detail["deferred_bytes"]) > 0        # held on the source itself
    assert cap.pub.journaled.seq < cap.pub.appended_seq
    cap.pub.max_inflight = 64 * MiB                 # the broker takes it again
    converged(spec)
    deadline = time.monotonic() + CONVERGE_S
    while True:
        (st,) = json.loads(run_x2x("status", pair_name, "--json").stdout)
        (rep,) = st["replicas"]
        if rep["lag_ops"] == 0:
            break
        assert time.monotonic() < deadline, f"the lag never went back to 0: {st}"
        time.sleep(0.5)
    assert rep["rpo_s"] == 0.0 and rep["lag_bytes"] == 0


def test_writes_after_an_idle_spell_show_their_own_age_as_the_rpo(settings, pair_name,
                                                                  tmp_path, live):
    """The target lags only by writes made after an idle spell: the RPO is their age, not
    the age of the last entry the target holds (an hour idle showed an hour of RPO)."""
    spec = make_pair(settings, pair_name, tmp_path, 32 * MiB)
    cap = started(live, spec)
    Applier(spec, spec.target, settings).run(until_caught_up=True)
    time.sleep(4)                                   # idle: the target's entry ages
    written = time.time()
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "flush", cap.uri)
    cap.pub.wait_journaled(cap.pub.appended_seq)    # journaled, and no applier runs
    deadline = time.monotonic() + CONVERGE_S
    while True:
        (st,) = json.loads(run_x2x("status", pair_name, "--json").stdout)
        (rep,) = st["replicas"]
        if rep["lag_ops"]:
            break
        assert time.monotonic() < deadline, f"the write never showed as lag: {st}"
        time.sleep(0.2)
    assert 0 < rep["rpo_s"] <= time.time() - written + 0.1, (rep, time.time() - written)

