"""x2x journal check --fsck: every consistency point of a real ext4 workload replays to a
clean filesystem, and a point that does not is reported as unclean."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from confluent_kafka import Producer

from consumers.check import CLEAN, NOT_A_FS, UNCLEAN, check_journal
from infra import control
from infra.topics import journal_topic
from journal.batch import Sequencer
from journal.ops import Op
from journal.pairs import PairSpec
from producers.scan import ScanResult, scan_once
from producers.state import StateStore
from schemas import codec
from tests.conftest import free_port, run_x2x, x2x_bin

MiB = 1 << 20
_TOOLS = ("mkfs.ext4", "fsck.ext4")
_ROOT_TOOLS = ("losetup", "mount", "umount", "fsfreeze")

needs_e2fsprogs = pytest.mark.skipif(
    any(shutil.which(t) is None for t in _TOOLS),
    reason="needs e2fsprogs (mkfs.ext4, fsck.ext4): apt-get install e2fsprogs")


def _root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount ext4 on a loop device"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control is missing)"
    missing = [t for t in (*_TOOLS, *_ROOT_TOOLS) if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (e2fsprogs, util-linux, mount)"
    return None


def _create_pair(settings, name: str, src: Path, tmp: Path) -> PairSpec:
    spec = PairSpec(name, str(src), str(tmp / "target.img"), 64 * 1024, src.stat().st_size)
    control.create_pair(settings, spec)
    return spec


def _mkfs(path: Path) -> None:
    # Eager inode-table and journal init: no lazy background writes after mount, so a
    # frozen or unmounted filesystem really is quiet while the scan reads it.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    str(path)], check=True, capture_output=True)


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def _mounted(image: Path, mnt: Path) -> Iterator[Path]:
    loop = _sh("losetup", "-f", "--show", str(image))
    try:
        mnt.mkdir(exist_ok=True)
        _sh("mount", "-t", "ext4", loop, str(mnt))
        try:
            yield mnt
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
            _sh("umount", str(mnt))
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@contextlib.contextmanager
def _frozen(mnt: Path) -> Iterator[None]:
    """fsfreeze: the kernel commits the ext4 journal and blocks writers, so a scan of the
    image sees a quiet, clean filesystem."""
    _sh("fsfreeze", "-f", str(mnt))
    try:
        yield
    finally:
        _sh("fsfreeze", "-u", str(mnt))


def _write_files(root: Path, rng: random.Random, count: int, prefix: str) -> None:
    d = root / prefix
    d.mkdir(exist_ok=True)
    for i in range(count):
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(1, 200_000)))


def _publish_garbage(settings, spec: PairSpec, last: ScanResult, offset: int,
                     length: int) -> tuple[int, int]:
    """Append a WRITE of random bytes plus a FLUSH to the journal, continuing the
    capturer's epoch and seq: a consistency point whose filesystem is damaged."""
    state, _ = StateStore(spec.name).load()
    seq = Sequencer(spec.name, last.epoch, last.last_seq + 1, state.epoch_bytes)
    now = int(time.time() * 1000)
    entries = seq.add(Op.write(offset, random.Random(9).randbytes(length)), now)
    entries += seq.add(Op.flush(), now)
    producer = Producer(settings.producer())
    for e in entries:
        producer.produce(journal_topic(spec.name), codec.encode_entry(e))
    assert producer.flush(15) == 0
    return last.epoch, entries[-1].last_seq


@needs_e2fsprogs
def test_damaged_superblock_point_is_reported_unclean(settings, pair_name, tmp_path):
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
    spec = _create_pair(settings, pair_name, src, tmp_path)
    scan_once(spec, settings)                       # before mkfs: not yet a filesystem
    _mkfs(src)
    last = scan_once(spec, settings)                # a fresh, clean filesystem
    epoch, bad_seq = _publish_garbage(settings, spec, last, 1024, 1024)

    report = check_journal(spec, settings, fsck=True)
    verdicts = [p.verdict for p in report.points]
    assert verdicts == [NOT_A_FS, CLEAN, UNCLEAN]
    (bad,) = report.unclean
    assert (bad.epoch, bad.seq) == (epoch, bad_seq) and bad.exit_code and bad.first_lines

    proc = run_x2x("journal", "check", pair_name, "--fsck", "--json", check=False)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    assert out["points_checked"] == 3 and out["clean"] == 1 and out["not_a_filesystem"] == 1
    assert [(u["epoch"], u["seq"]) for u in out["unclean"]] == [(epoch, bad_seq)]
    assert f"{epoch}:{bad_seq}" in proc.stderr and "not a clean filesystem" in proc.stderr


def test_check_without_fsck_replays_and_counts_points(settings, pair_name, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(3).randbytes(2 * MiB))
    spec = _create_pair(settings, pair_name, src, tmp_path)
    scan_once(spec, settings)
    scan_once(spec, settings)
    out = json.loads(run_x2x("journal", "check", pair_name, "--json").stdout)
    assert out["points_checked"] == 2 and out["fsck"] is False and out["ok"] is True
    assert out["bytes_applied"] == 2 * MiB
    # A scratch replay is invisible to operators: no replica appears in x2x status.
    (row,) = json.loads(run_x2x("status", pair_name, "--json").stdout)
    assert row["replicas"] == [] and row["state"] == "created"


@pytest.mark.root
def test_ext4_workload_is_clean_at_every_flush_point(settings, pair_name, tmp_path):
    reason = _root_skip_reason()
    if reason:
        pytest.skip(reason)
    rng = random.Random(42)
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    spec = _create_pair(settings, pair_name, src, tmp_path)
    scan_once(spec, settings)                           # 1: zeros, before mkfs
    _mkfs(src)
    scan_once(spec, settings)                           # 2: fresh filesystem
    with _mounted(src, tmp_path / "mnt") as mnt:
        _write_files(mnt, rng, 40, "a")
        with _frozen(mnt):
            scan_once(spec, settings)                   # 3: frozen after a first batch
        _write_files(mnt, rng, 30, "b")
        for i in range(0, 40, 3):
            (mnt / "a" / f"f{i}").unlink()
        os.rename(mnt / "b", mnt / "b2")
        _sh("sync")
        # 4: mounted and synced but not frozen, as after a crash: its ext4 journal still
        # needs recovery, which the checker replays into a copy before checking.
        scan_once(spec, settings)
        _write_files(mnt, rng, 20, "c")
        with _frozen(mnt):
            scan_once(spec, settings)                   # 5: frozen again
    scan_once(spec, settings)                           # 6: cleanly unmounted

    proc = run_x2x("journal", "check", pair_name, "--fsck", "--json", "--points",
                   check=False)
    out = json.loads(proc.stdout)
    assert proc.returncode == 0, (out["unclean"], proc.stderr)
    assert out["points_checked"] >= 3 and out["points_checked"] == 6
    assert out["unclean"] == [] and out["not_a_filesystem"] == 1 and out["clean"] == 5
    assert out["journal_replayed"] >= 1
    assert [p["verdict"] for p in out["points"]] == [NOT_A_FS] + [CLEAN] * 5


def _nbd_skip_reason() -> str | None:
    reason = _root_skip_reason()
    if reason:
        return reason
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse for nbdfuse"
    missing = [t for t in ("nbdfuse", "fusermount3") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install libnbd-bin fuse3)"
    if "--nbd" not in run_x2x("capture", "--help").stdout:
        return "the NBD capturer (x2x capture --nbd) is not available"
    return None


@contextlib.contextmanager
def _nbd_capturer(name: str, tmp: Path) -> Iterator[Path]:
    """``x2x capture NAME --nbd`` as a user runs it, its export as a file via nbdfuse;
    yields that file. The capturer is stopped cleanly (SIGTERM) at the end."""
    port = free_port()
    proc = subprocess.Popen([x2x_bin(), "capture", name, "--nbd", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    disk, pidfile = tmp / "nbd-disk", tmp / "nbdfuse.pid"
    fuse = None
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the NBD capturer did not listen"
            time.sleep(0.05)
        disk.touch()
        fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(disk),
                                 f"nbd://127.0.0.1:{port}/{name}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not pidfile.exists():
            assert fuse.poll() is None, fuse.stderr.read()
            assert time.monotonic() < deadline, "nbdfuse did not come up"
            time.sleep(0.05)
        yield disk
    finally:
        if fuse is not None:
            subprocess.run(["fusermount3", "-u", str(disk)], capture_output=True)
            fuse.wait(30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)


@pytest.mark.root
def test_ext4_written_through_the_nbd_export_is_clean_at_every_flush(settings, pair_name,
                                                                     tmp_path):
    """The issue's workload: mkfs.ext4 + mount + files + sync + umount on a loop device
    over nbdfuse over the x2x NBD capturer; every FLUSH the kernel sent is a point."""
    reason = _nbd_skip_reason()
    if reason:
        pytest.skip(reason)
    rng = random.Random(7)
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    _create_pair(settings, pair_name, src, tmp_path)
    with _nbd_capturer(pair_name, tmp_path) as disk:
        _mkfs(disk)
        with _mounted(disk, tmp_path / "mnt") as mnt:
            _write_files(mnt, rng, 30, "a")
            _sh("sync")
            for i in range(0, 30, 4):
                (mnt / "a" / f"f{i}").unlink()
            _write_files(mnt, rng, 20, "b")
            _sh("sync")

    proc = run_x2x("journal", "check", pair_name, "--fsck", "--json", "--points",
                   check=False)
    out = json.loads(proc.stdout)
    assert proc.returncode == 0, json.dumps(out["points"], indent=1)
    # Points inside mkfs (primary superblock not yet written) count apart, not as unclean.
    assert out["points_checked"] >= 3 and out["unclean"] == [] and out["clean"] >= 3
    assert out["clean"] + out["not_a_filesystem"] == out["points_checked"]
    assert out["journal_replayed"] >= 1      # points taken while mounted: ext4 journal dirty
