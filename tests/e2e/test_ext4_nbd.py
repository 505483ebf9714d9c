"""A real filesystem on a replicated volume: ext4 made and filled through the NBD capturer
(nbdfuse -> loop device -> mkfs.ext4 -> mount), then rebuilt on the target by the applier.

The target must pass ``fsck.ext4 -fn`` and, mounted read-only, hold the same files with
the same blake3 digests. Needs root, /dev/fuse and loop devices; skips naming what is
missing. Every mount, loop device and FUSE mount is undone in ``finally`` blocks.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import blake3
import pytest

from consumers.applier import Applier
from infra import control
from journal.pairs import PairSpec
from producers.journaling import Mode
from producers.nbd_capture import NBDCapture

pytestmark = pytest.mark.root
MiB = 1 << 20
SIZE = 256 * MiB
_TOOLS = {"nbdfuse": "libnbd-bin", "fusermount3": "fuse3", "losetup": "mount",
          "mount": "mount", "umount": "mount", "mkfs.ext4": "e2fsprogs",
          "fsck.ext4": "e2fsprogs"}


def _requirements() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mounts)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse (nbdfuse exposes the export as a file through FUSE)")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("needs loop devices (/dev/loop-control is missing)")
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")


def sh(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def quietly(*args: str) -> None:
    """Cleanup step: best effort, never masks the test's own failure."""
    subprocess.run(args, capture_output=True, timeout=60)


@contextlib.contextmanager
def fuse_file(uri: str, work: Path) -> Iterator[Path]:
    """nbdfuse: the NBD export ``uri`` as the file ``work/fuse/disk``; unmounted (lazily:
    its server may be gone) at the end."""
    fuse_dir, pidfile = work / "fuse", work / "nbdfuse.pid"
    fuse_dir.mkdir(exist_ok=True)
    pidfile.unlink(missing_ok=True)
    fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(fuse_dir / "disk"), uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert fuse.poll() is None, f"nbdfuse exited: {fuse.stderr.read().decode()}"
            assert time.monotonic() < deadline, "nbdfuse did not become ready"
            time.sleep(0.05)
        yield fuse_dir / "disk"
    finally:
        quietly("fusermount3", "-u", "-z", str(fuse_dir))
        try:
            fuse.wait(30)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait(10)


@contextlib.contextmanager
def mounted_export(uri: str, work: Path, mkfs: bool = False) -> Iterator[Path]:
    """nbdfuse -> loop device -> (mkfs.ext4) -> mount; all undone at the end."""
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    loop = None
    mounted = False
    with fuse_file(uri, work) as disk:
        try:
            loop = sh("losetup", "--find", "--show", str(disk)).strip()
            if mkfs:
                sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                   loop)
            sh("mount", "-t", "ext4", loop, str(mnt))
            mounted = True
            yield mnt
            sh("sync", "-f", str(mnt))
            sh("umount", str(mnt))
            mounted = False
        finally:
            if mounted:
                quietly("umount", "-l", str(mnt))
            if loop:
                quietly("losetup", "-d", loop)


def write_tree(root: Path, seed: int) -> dict[str, str]:
    """Many small files in nested folders and a few large ones; returns their digests."""
    rng = random.Random(seed)
    digests: dict[str, str] = {}
    for i in range(400):
        rel = Path(f"d{i % 13}") / f"e{i % 5}" / f"small-{i}.bin"
        data = rng.randbytes(rng.randint(1, 24 * 1024))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        digests[str(rel)] = blake3.blake3(data).hexdigest()
    for i, size in enumerate((9 * MiB, 17 * MiB, 30 * MiB + 123)):
        rel = Path("big") / f"large-{i}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        (root / rel).write_bytes(data)
        digests[str(rel)] = blake3.blake3(data).hexdigest()
    return digests


def read_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): blake3.blake3(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and "lost+found" not in p.parts}


def test_ext4_through_nbd_replicates_to_a_mountable_target(settings, pair_name, tmp_path):
    _requirements()
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    for p in (src, dst):
        with open(p, "wb") as f:
            f.truncate(SIZE)
    spec = PairSpec(pair_name, str(src), str(dst), 65536, SIZE)
    control.create_pair(settings, spec)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0, Mode.ASYNC).start()
    try:
        with mounted_export(cap.uri, tmp_path, mkfs=True) as mnt:
            digests = write_tree(mnt, seed=1)
    finally:
        report = cap.stop()
    assert report.clean and report.bytes > 56 * MiB

    Applier(spec, str(dst), settings).run(until_caught_up=True)
    sh("fsck.ext4", "-fn", str(dst))
    loop = None
    try:
        loop = sh("losetup", "--find", "--show", "--read-only", str(dst)).strip()
        sh("mount", "-t", "ext4", "-o", "ro,noload", loop, str(mnt))
        try:
            assert read_tree(mnt) == digests
        finally:
            quietly("umount", str(mnt))
    finally:
        if loop:
            quietly("losetup", "-d", loop)
