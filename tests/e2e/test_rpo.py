"""The RPO from the client's point of view (journal/DESIGN.md rule 8), with real processes:
``x2x capture --nbd`` in async mode holds a burst on the source while a writer that never
flushes keeps it busy (burst absorption, producers/deferred.py), ``x2x apply`` follows.

During the burst ``x2x status`` shows it as lag, with a non-zero RPO. Then the source
host dies (SIGKILL) and ``x2x pair failover --force`` promotes the target: the target
holds a prefix of the writes, and the RPO it reports is consistent with what the target
misses, as the writes' own time stamps say: the oldest write the target lacks is no
older than the reported bound allows, and the reported RPO is not less than its age by
more than a heartbeat interval.

Needs root and /dev/fuse (nbdfuse exposes the export as a file); skips naming what is
missing. Every FUSE mount and child process is undone in finally blocks.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from journal.status import BEAT_LATE_S, CAPTURE_BEAT_S
from tests.conftest import run_x2x, x2x_bin
from tests.e2e.test_ext4_nbd import _requirements, fuse_file
from tests.e2e.test_failover import capturer, new_pair
from tests.integration.test_nbd_capture import wait_beat

pytestmark = pytest.mark.root
MiB = 1 << 20
BLOCK = 64 * 1024
TAG = struct.Struct("<Qd")          # write number, time it was issued


class TaggedWriter(threading.Thread):
    """Writes 64 KiB blocks one after the other, each tagged with its number, never flushing;
    keeps (number, time acknowledged) of every write that returned."""

    def __init__(self, path: Path, blocks: int) -> None:
        super().__init__(daemon=True)
        self.path, self.blocks = path, blocks
        self.acked: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for i in range(1, self.blocks):     # block 0 stays as it was
                if self.stop.is_set():
                    return
                os.pwrite(fd, TAG.pack(i, time.time()) * (BLOCK // TAG.size), i * BLOCK)
                self.acked.append((i, time.time()))
                time.sleep(0.005)   # ~12 MB/s: busy all along (QUIET is 20 ms), for 20 s
        except OSError as e:
            self.error = str(e)                 # the source died under it
        finally:
            try:
                os.close(fd)
            except OSError:
                pass                            # the FUSE mount went with the source


def on_target(target: str, blocks: int) -> set[int]:
    """The write numbers the target holds."""
    found = set()
    with open(target, "rb") as f:
        for i in range(1, blocks):
            f.seek(i * BLOCK)
            n, _ = TAG.unpack(f.read(TAG.size))
            if n == i:
                found.add(i)
    return found


@contextlib.contextmanager
def fuse_file_after_baseline(settings, name: str, uri: str, work: Path) -> Iterator[Path]:
    wait_beat(settings, name, lambda b: b.detail.get("baseline") == "done")
    with fuse_file(uri, work) as disk:
        yield disk


def status_of(name: str) -> dict:
    (st,) = json.loads(run_x2x("status", name, "--json").stdout)
    return st


def test_forced_failover_during_a_held_burst_reports_what_the_target_misses(
        settings, pair_name, tmp_path, monkeypatch):
    _requirements()
    size = 256 * MiB
    blocks = size // BLOCK
    spec = new_pair(settings, pair_name, tmp_path, size)
    # The burst stays on the source as long as the writer keeps writing.
    monkeypatch.setenv("X2X_ASYNC_HOLD", "120")
    applier_log = open(tmp_path / "apply.log", "w")
    applier = subprocess.Popen([x2x_bin(), "apply", pair_name], stdout=applier_log,
                               stderr=subprocess.STDOUT)
    writer = None
    try:
        with (capturer(pair_name, tmp_path / "cap.log", "async") as (proc, uri),
              fuse_file_after_baseline(settings, pair_name, uri, tmp_path) as disk):
            writer = TaggedWriter(disk, blocks)
            writer.start()
            deadline = time.monotonic() + 30
            while True:             # status during the burst: lag, and a non-zero RPO
                st = status_of(pair_name)
                reps = [r for r in st["replicas"] if r["target"] == spec.target]
                if reps and (reps[0]["lag_bytes"] or 0) >= 4 * MiB and reps[0]["rpo_s"]:
                    break
                assert writer.is_alive(), f"the writer ended first: {writer.error}"
                assert time.monotonic() < deadline, f"the burst never showed as lag: {st}"
                time.sleep(0.3)
            during = reps[0]
            assert int(st["capture_detail"]["unjournaled_bytes"]) >= 4 * MiB
            time.sleep(1.0)
            assert writer.is_alive(), "the burst must still be running at the crash"
            proc.kill()                 # the source host dies, mid-burst
            killed_at = time.time()
            proc.wait(10)
            writer.stop.set()
    finally:
        if writer is not None:
            writer.stop.set()
            writer.join(30)
        applier.terminate()             # a forced failover drains the journal itself
        applier.wait(60)
        applier_log.close()
    r = json.loads(run_x2x("pair", "failover", pair_name, "--force", "--json").stdout)
    acked = {i: t for i, t in writer.acked if t < killed_at}
    held = on_target(spec.target, blocks)
    missed = sorted(i for i in acked if i not in held)
    # A prefix: every write the target holds came before every write it misses.
    assert not held or not missed or max(held) < missed[0], (len(held), missed[:5])
    assert missed and r["rpo_ops"] >= 1, r
    age = killed_at - acked[missed[0]]         # of the oldest write lost, at the crash
    assert r["rpo_max_s"] is not None and age <= r["rpo_max_s"] + 0.2, (age, r)
    assert r["rpo_s"] > 0 and r["rpo_s"] >= age - CAPTURE_BEAT_S - BEAT_LATE_S - 0.5, (age, r)
    print(f"\nheld burst: status showed lag {during['lag_ops']} ops "
          f"({during['lag_bytes'] / MiB:.1f} MiB), RPO {during['rpo_s']:.2f} s; forced "
          f"failover: {len(missed)} of {len(acked)} acknowledged writes missed, the oldest "
          f"{age:.2f} s old at the crash; reported RPO {r['rpo_s']:.2f} s, at most "
          f"{r['rpo_max_s']:.2f} s, {r['rpo_ops']} ops")
