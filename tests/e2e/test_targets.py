"""Targets in the destination's format, NBD targets and sources, block devices (V2P).

- every image format x2x writes (qcow2, vmdk, vhdx, vdi, vhd): `pair create --target
  disk.FMT --create-target`, scan capture, `x2x apply`: the image holds the source
  byte for byte (read back through qemu-nbd); a qcow2 stays thin when blocks are zeroed.
- an NBD URI as target and as scan source (qemu-nbd serving raw files over TCP).
- a loop device as target: the same path as a file.
- an NBD target that goes away mid-apply (its qemu-nbd killed right after a checkpoint,
  back a second later): the applier reconnects, resumes from its checkpoint, loses nothing.
- bad input: unknown format, qemu-img missing, a target smaller than the source, an
  image of another format, an unreachable NBD server, --create-target on an NBD URI, an
  NBD source for the NBD capturer; each a clear error and nothing left behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from consumers.applier import Applier
from infra import control
from infra.kafka import KafkaSettings
from tests.conftest import free_port, make_image, run_x2x, same_bytes

MiB = 1 << 20


def _need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed (scripts/setup-system.sh installs it)")


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@contextlib.contextmanager
def nbd_server(image: Path, export: str, port: int | None = None, read_only: bool = False
               ) -> Iterator[tuple[subprocess.Popen, str]]:
    """qemu-nbd serving a raw file on 127.0.0.1 (a peer's NBD server, not x2x's)."""
    port = port or free_port()
    args = ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", export,
            "--persistent", "--shared", "4", *(["-r"] if read_only else []), str(image)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield proc, f"nbd://127.0.0.1:{port}/{export}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    import socket
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"qemu-nbd did not listen on {port}"
            time.sleep(0.05)


def _replicate(name: str) -> None:
    run_x2x("capture", name, "--once")
    run_x2x("apply", name, "--until-caught-up")


def _digest(volume: str) -> str:
    return run_x2x("volume", "digest", volume).stdout.split()[0]


# -- image formats -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vdi", "vhd"])
def test_image_target_holds_the_source(broker, pair_name, tmp_path, fmt):
    _need("qemu-img", "qemu-nbd")
    src = make_image(tmp_path / "src.img", 24 * MiB, seed=3)
    with open(src, "r+b") as f:         # blocks of one byte: FILL ops, written through NBD
        f.seek(5 * MiB)
        f.write(b"\xff" * (2 * MiB + 4096))
    target = tmp_path / f"disk.{fmt}"
    out = run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(target),
                  "--create-target").stdout
    assert str(target) in out
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(target)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == ("vpc" if fmt == "vhd" else fmt)
    _replicate(pair_name)
    assert _digest(str(target))[:16] == _digest(str(src))[:16]
    # The image reads back as the source through qemu itself, not only through x2x.
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(target), str(raw)], check=True)
    assert same_bytes(raw, src, 24 * MiB)


def test_qcow2_stays_thin_and_format_flag_wins(broker, pair_name, tmp_path):
    """Zeroed blocks leave the image (WRITE_ZEROES may deallocate), and --target-format
    names the format when the extension does not."""
    _need("qemu-img", "qemu-nbd")
    src = make_image(tmp_path / "src.img", 64 * MiB, seed=5, data_fraction=0.75)
    target = tmp_path / "disk.img"
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(target),
            "--target-format", "qcow2", "--create-target")
    st = control.get_pair(KafkaSettings.resolve(broker.bootstrap), pair_name)
    assert st.spec.target == f"qcow2:{target}"
    _replicate(pair_name)
    full = _allocated(target)
    assert full >= 40 * MiB
    with open(src, "r+b") as f:            # the guest zeroes most of its disk
        f.write(bytes(48 * MiB))
    _replicate(pair_name)
    assert _digest(f"qcow2:{target}") == _digest(str(src))
    assert _allocated(target) < full - 32 * MiB, (full, _allocated(target))


# -- NBD URIs and block devices --------------------------------------------------------------
def test_nbd_source_and_nbd_target(broker, pair_name, tmp_path):
    _need("qemu-nbd")
    src = make_image(tmp_path / "src.img", 32 * MiB, seed=7)
    dst = tmp_path / "remote-target.img"
    os.truncate(_empty(dst), 32 * MiB)
    with nbd_server(src, "src", read_only=True) as (_, src_uri), \
            nbd_server(dst, "dst") as (_, dst_uri):
        run_x2x("pair", "create", pair_name, "--source", src_uri, "--target", dst_uri)
        _replicate(pair_name)
        assert _digest(dst_uri) == _digest(src_uri)
        refused = run_x2x("capture", pair_name, "--nbd", str(free_port()), check=False)
        assert refused.returncode == 2
        assert "capture it by scanning" in refused.stderr
    assert same_bytes(dst, src)


def test_block_device_target(broker, pair_name, tmp_path):
    """V2P: a block device (a loop device here) takes the same path as a file."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    src = make_image(tmp_path / "src.img", 32 * MiB, seed=9)
    backing = tmp_path / "disk.bin"
    with open(backing, "wb") as f:
        f.write(os.urandom(40 * MiB))        # stale bytes the replication must replace
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        run_x2x("pair", "create", pair_name, "--source", str(src), "--target", dev)
        _replicate(pair_name)
        assert run_x2x("volume", "digest", dev, "--length", str(32 * MiB)).stdout.split()[0] \
            == _digest(str(src))
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_nbds_target_with_client_certificates(broker, pair_name, tmp_path):
    """nbds:// with ?tls-certificates=DIR (x2x nbd-certs makes it; qemu-nbd checks the
    client certificate); plain nbd:// to it and nbds:// without the CA are refused."""
    _need("qemu-nbd")
    certs = tmp_path / "certs"
    run_x2x("nbd-certs", str(certs))
    src = make_image(tmp_path / "src.img", 16 * MiB, seed=17)
    dst = tmp_path / "tls-target.img"
    os.truncate(_empty(dst), 16 * MiB)
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server,"
         "verify-peer=on", "--tls-creds", "tls0", "-f", "raw", "-b", "127.0.0.1", "-p",
         str(port), "-x", "t", "--persistent", str(dst)], stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        err = _refused("pair", "create", pair_name, "--source", str(src), "--target",
                       f"nbd://127.0.0.1:{port}/t")
        assert "requires TLS: use an nbds:// URI" in err
        err = _refused("pair", "create", pair_name, "--source", str(src), "--target",
                       f"nbds://127.0.0.1:{port}/t")
        assert "TLS with NBD server" in err and "?tls-certificates=DIR" in err
        uri = f"nbds://127.0.0.1:{port}/t?tls-certificates={certs}"
        run_x2x("pair", "create", pair_name, "--source", str(src), "--target", uri)
        _replicate(pair_name)
    finally:
        proc.terminate()
        proc.wait(10)
    assert same_bytes(dst, src)


# -- an NBD target that goes away ------------------------------------------------------------
def test_nbd_target_lost_mid_apply_resumes_from_checkpoint(broker, pair_name, tmp_path,
                                                           settings):
    _need("qemu-nbd")
    src = make_image(tmp_path / "src.img", 32 * MiB, seed=11)
    dst = tmp_path / "target.img"
    os.truncate(_empty(dst), 32 * MiB)
    port = free_port()
    state: dict[str, object] = {}
    with nbd_server(dst, "t", port) as (proc, uri):
        run_x2x("pair", "create", pair_name, "--source", str(src), "--target", uri)
        run_x2x("capture", pair_name, "--once")          # consistency point 1
        for seed in (12, 13, 14):                        # three more
            with open(src, "r+b") as f:
                f.seek(seed * MiB)
                f.write(os.urandom(4 * MiB))
            run_x2x("capture", pair_name, "--once")
        spec = control.get_pair(settings, pair_name).spec

        def back_later() -> None:
            time.sleep(1.5)
            state["server"] = subprocess.Popen(
                ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "t",
                 "--persistent", "--shared", "4", str(dst)], stderr=subprocess.PIPE)

        def on_checkpoint(pos) -> None:
            if "killed_at" not in state:              # the target's server dies
                proc.kill()
                proc.wait()
                state["killed_at"] = pos
                threading.Thread(target=back_later, daemon=True).start()
        try:
            applier = Applier(spec, uri, settings, on_checkpoint=on_checkpoint)
            stats = applier.run(until_caught_up=True)
        finally:
            server = state.get("server")
            if isinstance(server, subprocess.Popen):
                server.terminate()
                server.wait(10)
    assert "killed_at" in state
    assert stats.reconnects >= 1, stats
    assert stats.stopped_by == "caught-up"
    assert applier.checkpointed.seq > state["killed_at"].seq
    assert same_bytes(dst, src)


def test_own_qemu_nbd_killed_mid_apply_is_restarted(broker, pair_name, tmp_path, settings):
    """The qemu-nbd x2x runs for a qcow2 target dies: a new one is started, applying
    resumes from the checkpoint, the image ends equal to the source."""
    _need("qemu-img", "qemu-nbd")
    src = make_image(tmp_path / "src.img", 32 * MiB, seed=41)
    target = tmp_path / "disk.qcow2"
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(target),
            "--create-target")
    for seed in (None, 42, 43):
        if seed:
            with open(src, "r+b") as f:
                f.seek(seed % 8 * 3 * MiB)
                f.write(os.urandom(3 * MiB))
        run_x2x("capture", pair_name, "--once")
    spec = control.get_pair(settings, pair_name).spec
    killed: list[int] = []

    def on_checkpoint(pos) -> None:
        if not killed:
            proc = applier.vol.server.proc
            killed.append(proc.pid)
            proc.kill()
            proc.wait()
    applier = Applier(spec, str(target), settings, on_checkpoint=on_checkpoint)
    stats = applier.run(until_caught_up=True)
    assert killed and stats.reconnects >= 1 and stats.stopped_by == "caught-up", stats
    assert _digest(str(target)) == _digest(str(src))


# -- bad input ---------------------------------------------------------------------------------
def _refused(*args: str, code: int | None = None, env: dict[str, str] | None = None) -> str:
    r = run_x2x(*args, check=False, env=env)
    assert r.returncode != 0, r.stdout
    if code is not None:
        assert r.returncode == code, r.stderr
    return " ".join(r.stderr.split())


def test_bad_targets_are_refused_and_nothing_is_left(broker, pair_name, tmp_path):
    _need("qemu-img", "qemu-nbd")
    src = make_image(tmp_path / "src.img", 16 * MiB, seed=1)
    create = ("pair", "create", pair_name, "--source", str(src))

    err = _refused(*create, "--target", str(tmp_path / "a.img"), "--target-format", "qcow3",
                   "--create-target", code=2)
    assert "unknown disk format 'qcow3'" in err and "qcow2" in err
    assert not (tmp_path / "a.img").exists()

    bare = {"PATH": str(Path(sys.executable).parent)}    # no qemu-img on the PATH
    err = _refused(*create, "--target", str(tmp_path / "b.qcow2"), "--create-target", env=bare)
    assert "needs qemu-img" in err and "apt-get install qemu-utils" in err
    assert not (tmp_path / "b.qcow2").exists()

    small = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(small), "8M"], check=True)
    err = _refused(*create, "--target", str(small))
    assert "smaller than source" in err and f"qemu-img resize {small} {16 * MiB}" in err

    wrong = tmp_path / "really-raw.qcow2"
    os.truncate(_empty(wrong), 16 * MiB)
    err = _refused(*create, "--target", str(wrong), code=2)
    assert "holds a raw image, not qcow2" in err and "--target-format raw" in err

    err = _refused(*create, "--target", f"nbd://127.0.0.1:{free_port()}/x")
    assert "cannot connect to NBD server 127.0.0.1" in err

    err = _refused(*create, "--target", "nbd://127.0.0.1/x", "--create-target", code=2)
    assert "cannot create it; drop --create-target" in err

    # The pair exists already: the image made for the second create goes again.
    run_x2x(*create, "--target", str(tmp_path / "first.qcow2"), "--create-target")
    err = _refused(*create, "--target", str(tmp_path / "second.qcow2"), "--create-target")
    assert pair_name in err
    assert not (tmp_path / "second.qcow2").exists()
    assert control.get_pair(KafkaSettings.resolve(broker.bootstrap),
                            pair_name).spec.target == str(tmp_path / "first.qcow2")


def test_failback_from_a_promoted_qcow2(broker, pair_name, tmp_path):
    """After a failover the qcow2 is the source: it is read through qemu-nbd (hashes,
    resends, SEAL digest), never as the raw bytes of its container."""
    _need("qemu-img", "qemu-nbd", "qemu-io")
    src = make_image(tmp_path / "src.img", 16 * MiB, seed=21)
    target = tmp_path / "disk.qcow2"
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(target),
            "--create-target")
    _replicate(pair_name)
    run_x2x("pair", "failover", pair_name)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(target)],
                   check=True, capture_output=True)          # the promoted side is written
    assert _digest(str(target)) != _digest(str(src))
    out = run_x2x("pair", "failback", pair_name).stdout
    assert "32 of 256 blocks differ" in out, out
    assert _digest(str(src)) == _digest(str(target))


def test_replica_in_qcow2(broker, pair_name, tmp_path):
    """A replica (a drill copy) can be an image too: created in its format, not as a raw
    file with an image's name."""
    _need("qemu-img", "qemu-nbd")
    src = make_image(tmp_path / "src.img", 16 * MiB, seed=31)
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target",
            str(tmp_path / "t.img"), "--create-target")
    run_x2x("capture", pair_name, "--once")
    drill = tmp_path / "drill.qcow2"
    run_x2x("replica", "add", pair_name, "--target", str(drill), "--at", "now")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(drill)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert _digest(str(drill)) == _digest(str(src))


def test_copy_sparse_onto_an_image(tmp_path):
    """A history base seeds a replica or rewinds a target with copy_sparse: onto a qcow2
    it writes through qemu-nbd, never the raw bytes into the container."""
    _need("qemu-img", "qemu-nbd")
    from infra import images
    from infra.volumes import copy_sparse
    src = make_image(tmp_path / "base.img", 16 * MiB, seed=51)
    dst = images.locate(str(tmp_path / "seeded.qcow2"))
    images.create(dst, 16 * MiB)
    copy_sparse(str(src), dst.text, 16 * MiB)
    assert _digest(dst.text) == _digest(str(src))
    assert images.image_info(dst)["format"] == "qcow2"
