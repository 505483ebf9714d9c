"""Failover, failback and failover back again, with real processes and real clients.

- planned: ext4 made and filled through the NBD capturer (nbdfuse -> loop -> mkfs.ext4 ->
  mount) of x2x capture --nbd; x2x pair failover seals, drains, verifies the digest and
  promotes; the promoted target mounts with every file; the promoted side is served
  (capture --nbd) and written; failback sends only differing blocks; a second failover
  returns the workload, and the original side holds everything.
- forced: the capturer is killed while a writer fsyncs files; the target passes
  fsck.ext4 -fn and holds every file fsynced before the kill.
- bad input: unknown pair, already promoted pair, split brain, digest mismatch: each a
  clear error, nothing changed.

The ext4 tests need root, /dev/fuse and loop devices (skipped naming what is missing);
every mount, loop device, FUSE mount and child process is undone in finally blocks.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import blake3

from consumers.applier import Applier
from infra import control
from journal.blocks import HASH_LEN, diff_maps, hash_buffer
from journal.pairs import PairSpec
from producers.nbd_capture import NBDCapture
from tests.conftest import free_port, make_image, run_x2x, same_bytes, x2x_bin
from tests.e2e.test_ext4_nbd import (_requirements, mounted_export, quietly,
                                     read_tree, sh)

MiB = 1 << 20
BLOCK = 65536


# -- helpers -------------------------------------------------------------------------------
@contextlib.contextmanager
def service(args: list[str], log: Path, ready: str, env: dict[str, str] | None = None,
            grace: float = 60) -> Iterator[subprocess.Popen]:
    """An x2x service as a child process, its output in ``log``, yielded once ``ready``
    appears there; SIGTERM at the end (SIGKILL after ``grace`` seconds)."""
    out = open(log, "w+")
    proc = subprocess.Popen([x2x_bin(), *args], stdout=out, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while ready not in log.read_text():
            assert proc.poll() is None, f"{args[0]} exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no {ready!r}:\n{log.read_text()}"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        out.close()


@contextlib.contextmanager
def capturer(name: str, log: Path, mode: str = "async"
             ) -> Iterator[tuple[subprocess.Popen, str]]:
    """`x2x capture NAME --nbd PORT --mode MODE` as a child process; yields it and its
    NBD URI."""
    port = free_port()
    with service(["capture", name, "--nbd", f"127.0.0.1:{port}", "--mode", mode], log,
                 "serving") as proc:
        yield proc, f"nbd://127.0.0.1:{port}/{name}"


def abandon_export(mnt: Path, work: Path) -> None:
    """Undo a :func:`mounted_export` whose server died: the filesystem on the dead export
    cannot be unmounted cleanly, so lazily, then its loop device and FUSE mount."""
    quietly("umount", "-l", str(mnt))
    quietly("sh", "-c", f"losetup -j {work}/fuse/disk | cut -d: -f1 | xargs -r losetup -d")
    quietly("fusermount3", "-u", "-z", str(work / "fuse"))


@contextlib.contextmanager
def mounted_image(path: str, work: Path, readonly: bool = True) -> Iterator[Path]:
    mnt = work / "img-mnt"
    mnt.mkdir(exist_ok=True)
    args = ["losetup", "--find", "--show"] + (["--read-only"] if readonly else []) + [path]
    loop = sh(*args).strip()
    try:
        sh("mount", "-t", "ext4", "-o", "ro,noload" if readonly else "rw", loop, str(mnt))
        try:
            yield mnt
        finally:
            quietly("umount", str(mnt))
    finally:
        quietly("losetup", "-d", loop)


def write_files(root: Path, seed: int, count: int = 120, big: tuple[int, ...] = (3 * MiB,),
                prefix: str = "") -> dict[str, str]:
    rng = random.Random(seed)
    digests: dict[str, str] = {}
    for i in range(count):
        rel = Path(f"{prefix}d{i % 7}") / f"f-{seed}-{i}.bin"
        data = rng.randbytes(rng.randint(1, 20 * 1024))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        digests[str(rel)] = blake3.blake3(data).hexdigest()
    for i, size in enumerate(big):
        rel = Path(f"{prefix}big") / f"large-{seed}-{i}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)
        (root / rel).write_bytes(data)
        digests[str(rel)] = blake3.blake3(data).hexdigest()
    return digests


def differing_blocks(a: str, b: str) -> int:
    def hashes(p: str) -> bytes:
        with open(p, "rb") as f:
            return b"".join(hash_buffer(memoryview(f.read()), BLOCK))
    return len(diff_maps(hashes(a), hashes(b)))


def new_pair(settings, name: str, tmp_path: Path, size: int, data: float = 0.0) -> PairSpec:
    src = make_image(tmp_path / "a.img", size, seed=3, data_fraction=data)
    dst = tmp_path / "b.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    spec = PairSpec(name, str(src), str(dst), BLOCK, size)
    control.create_pair(settings, spec)
    return spec


def state_of(settings, name: str):
    return control.get_pair(settings, name)


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return float(m.group(1))


# -- planned failover, failback, failover back ------------------------------------------
def test_planned_failover_failback_and_back_with_ext4(settings, pair_name, tmp_path):
    _requirements()
    size = 128 * MiB
    spec = new_pair(settings, pair_name, tmp_path, size)
    a, b = spec.source, spec.target

    with capturer(pair_name, tmp_path / "cap-a.log") as (proc, uri):
        with mounted_export(uri, tmp_path, mkfs=True) as mnt:
            first = write_files(mnt, seed=1)
        out = run_x2x("pair", "failover", pair_name)
        proc.wait(30)
        assert proc.returncode == 0, (tmp_path / "cap-a.log").read_text()
    downtime = number(r"downtime ([\d.]+) s", out.stdout)
    assert "RPO 0" in out.stdout and "digest verified" in out.stdout
    st = state_of(settings, pair_name)
    assert st.state == "promoted" and st.reversed
    sh("fsck.ext4", "-fn", b)
    with mounted_image(b, tmp_path) as mnt:
        assert read_tree(mnt) == first

    # The promoted side is served and written: a new epoch, no baseline.
    with capturer(pair_name, tmp_path / "cap-b.log") as (proc, uri):
        assert "same epoch" in (tmp_path / "cap-b.log").read_text()
        with mounted_export(uri, tmp_path) as mnt:
            second = write_files(mnt, seed=2, count=60, big=(2 * MiB,), prefix="more/")
        actual = differing_blocks(a, b)
        fb = json.loads(run_x2x("pair", "failback", pair_name, "--json").stdout)
        differ, sent = fb["differing"], fb["bytes_sent"]
        assert differ == actual > 0
        # Only what differs travels: the hash map (32 B per block) plus the differing
        # blocks (zero blocks go as ZERO ops, so at most that).
        assert fb["hash_bytes"] == size // BLOCK * HASH_LEN
        assert fb["resent_bytes"] <= actual * BLOCK
        sent /= MiB
        assert state_of(settings, pair_name).state == "replicating"
        back = run_x2x("pair", "failover", pair_name)
        proc.wait(30)
    st = state_of(settings, pair_name)
    assert st.state == "promoted" and not st.reversed
    assert same_bytes(a, b)
    sh("fsck.ext4", "-fn", a)
    with mounted_image(a, tmp_path) as mnt:
        assert read_tree(mnt) == {**first, **second}
    print(f"\nplanned failover downtime {downtime:.2f} s; failback: {differ} blocks "
          f"differed ({actual * BLOCK / MiB:.1f} MiB), sent {sent:.2f} MiB; second failover "
          f"downtime {number(r'downtime ([0-9.]+) s', back.stdout):.2f} s")


# -- forced failover while a writer runs ------------------------------------------------
def test_forced_failover_while_writing_keeps_every_fsynced_file(settings, pair_name,
                                                                tmp_path):
    _requirements()
    size = 128 * MiB
    spec = new_pair(settings, pair_name, tmp_path, size)
    durable: dict[str, str] = {}
    stop = threading.Event()
    errors: list[str] = []

    def writer(root: Path) -> None:
        rng = random.Random(5)
        i = 0
        d = os.open(root, os.O_RDONLY)
        try:
            while not stop.is_set():
                data = rng.randbytes(rng.randint(1, 64 * 1024))
                name = f"w-{i}.bin"
                try:
                    with open(root / name, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.fsync(d)
                except OSError as e:
                    errors.append(str(e))
                    return
                durable[name] = blake3.blake3(data).hexdigest()
                i += 1
        finally:
            os.close(d)

    # flush-sync: every fsync waits for the journal, so every fsynced file must survive.
    # (In async mode an fsync waits for the source only: tests/e2e/test_postgres_async.py.)
    with capturer(pair_name, tmp_path / "cap-a.log", "flush-sync") as (proc, uri):
        with contextlib.ExitStack() as stack:
            mnt = stack.enter_context(mounted_export(uri, tmp_path, mkfs=True))
            t = threading.Thread(target=writer, args=(mnt,), daemon=True)
            t.start()
            time.sleep(4)
            before_kill = dict(durable)
            proc.kill()                      # the source is lost, mid-write
            proc.wait(10)
            stop.set()
            t.join(20)
            stack.pop_all()
            abandon_export(mnt, tmp_path)
    assert len(before_kill) > 20, f"the writer made too little progress: {errors}"
    out = run_x2x("pair", "failover", pair_name, "--force")
    rpo = number(r"RPO ([\d.]+) s", out.stdout)
    ops = int(number(r"(\d+) ops lost", out.stdout))
    st = state_of(settings, pair_name)
    assert st.state == "promoted" and st.reversed
    # Mounting replays the ext4 journal, as a promoted disk's first user would.
    with mounted_image(spec.target, tmp_path, readonly=False) as mnt:
        found = read_tree(mnt)
    for name, digest in before_kill.items():
        assert found.get(name) == digest, f"{name} was fsynced before the kill but is lost"
    sh("fsck.ext4", "-fn", spec.target)
    print(f"\nforced failover: {len(before_kill)} files fsynced before the kill, all kept; "
          f"RPO {rpo:.2f} s, {ops} ops")


# -- bad input: each a clear error, nothing changed ---------------------------------------
def test_failover_of_an_unknown_pair_is_refused(broker):
    r = run_x2x("pair", "failover", "no-such-pair-x", check=False)
    assert r.returncode != 0 and "no pair named 'no-such-pair-x'" in r.stderr


def test_failover_of_an_already_promoted_pair_is_refused(settings, pair_name, tmp_path):
    spec = new_pair(settings, pair_name, tmp_path, 8 * MiB, data=0.5)
    run_x2x("capture", pair_name, "--once")
    out = run_x2x("pair", "failover", pair_name)      # no capturer serves: sealed from here
    assert "RPO 0" in out.stdout and same_bytes(spec.source, spec.target)
    before = state_of(settings, pair_name)
    again = run_x2x("pair", "failover", pair_name, check=False)
    assert again.returncode != 0
    assert "already failed over" in again.stderr and f"failback {pair_name}" in again.stderr
    assert state_of(settings, pair_name) == before


def test_failback_while_the_old_source_serves_writes_is_split_brain(settings, pair_name,
                                                                     tmp_path):
    spec = new_pair(settings, pair_name, tmp_path, 8 * MiB, data=0.5)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0).start()
    try:
        while not cap.baseline.finished:
            time.sleep(0.02)
        cap.sync_point()
        forced = run_x2x("pair", "failover", pair_name, "--force")
        assert "still looks alive" in forced.stderr
        before = state_of(settings, pair_name)
        r = run_x2x("pair", "failback", pair_name, check=False)
        assert r.returncode != 0
        assert "split brain" in r.stderr and spec.source in r.stderr
        assert f"failback {pair_name}" in r.stderr
        assert state_of(settings, pair_name) == before
    finally:
        cap.stop()


def test_failover_with_a_diverged_target_promotes_nothing(settings, pair_name, tmp_path):
    spec = new_pair(settings, pair_name, tmp_path, 8 * MiB, data=0.5)
    run_x2x("capture", pair_name, "--once")
    Applier(spec, spec.target, settings).run(until_caught_up=True)
    fd = os.open(spec.target, os.O_RDWR)
    os.pwrite(fd, b"\xff" * 4096, 3 * BLOCK)
    os.close(fd)
    r = run_x2x("pair", "failover", pair_name, check=False)
    assert r.returncode != 0
    assert "NOT promoted" in r.stderr and "nothing was promoted" in r.stderr
    st = state_of(settings, pair_name)
    assert not st.reversed and st.state == "needs-resync"


def test_planned_failover_with_capture_and_apply_services_running(settings, pair_name,
                                                                  tmp_path):
    """Both sides as long-running services: the capturer seals on request, the running
    `x2x apply` drains to the SEAL, verifies it, publishes promoted and exits."""
    spec = new_pair(settings, pair_name, tmp_path, 16 * MiB, data=0.3)
    apply = subprocess.Popen([x2x_bin(), "apply", spec.name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        with capturer(pair_name, tmp_path / "cap.log") as (proc, uri):
            sh("qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 2M", "-c", "flush", uri)
            out = run_x2x("pair", "failover", pair_name, "--timeout", "20", timeout=60)
            # The service usually drains to the SEAL before the command looks; either
            # way exactly one promotion happens.
            assert "RPO 0" in out.stdout, out
            proc.wait(30)
            assert proc.returncode == 0
        assert apply.wait(30) == 0, apply.stderr.read()
    except BaseException:
        apply.kill()
        print("APPLY:", apply.communicate(timeout=10))
        raise
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.wait(10)
    assert same_bytes(spec.source, spec.target)
    assert state_of(settings, pair_name).reversed
