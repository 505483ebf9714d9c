"""x2x cutover with a real guest: Debian's kernel, a busybox initramfs, and an ext4 system
disk replicated to a qcow2 target (tests/guest.py builds them from Debian packages).

- test launch: while an `x2x apply` service keeps replicating, `cutover --test` copies
  the newest consistency point, boots it, sees the marker (with the token that point
  holds, read from the disk by the guest), removes the copy; the target is untouched.
- cutover: planned failover then boot of the promoted qcow2 target; the guest shows the
  token written last on the source; the downtime parts add up. `--accel auto`: KVM where
  it works, TCG after a message where it does not (this host's KVM hangs the guest).
- bad input: each refused before anything changes, the pair still replicating.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import control
from infra.kafka import KafkaSettings
from infra.paths import pair_dir
from tests import guest
from tests.conftest import run_x2x, x2x_bin

MiB = 1 << 20


@pytest.fixture(scope="module")
def debian_guest(tmp_path_factory) -> guest.Guest:
    why = guest.missing()
    if why:
        pytest.skip(why)
    return guest.build(tmp_path_factory.mktemp("guest"))


def _pair_with_guest_disk(name: str, tmp: Path, token: str) -> tuple[Path, Path]:
    src = guest.system_disk(tmp / "system.img", 64 * MiB, token)
    target = tmp / "target.qcow2"
    run_x2x("pair", "create", name, "--source", str(src), "--target", str(target),
            "--create-target")
    run_x2x("capture", name, "--once")
    run_x2x("apply", name, "--until-caught-up")
    return src, target


def _state(broker, name: str) -> str:
    return control.get_pair(KafkaSettings.resolve(broker.bootstrap), name).state


def test_test_launch_boots_a_copy_while_replication_goes_on(broker, pair_name, tmp_path,
                                                            debian_guest):
    src, target = _pair_with_guest_disk(pair_name, tmp_path, "first")
    guest.set_token(src, "second")
    run_x2x("capture", pair_name, "--once")            # the newest consistency point
    before = run_x2x("volume", "digest", str(target)).stdout.split()[0]
    log = open(tmp_path / "apply.log", "w")
    service = subprocess.Popen([x2x_bin(), "apply", pair_name], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        r = run_x2x("cutover", pair_name, "--test", *debian_guest.boot_args(), "--accel",
                    "tcg", "--up-marker", f"{guest.MARKER} second", "--boot-timeout", "240",
                    "--json", timeout=400)
        report = json.loads(r.stdout)
        assert report["boot"]["up"], report
        assert report["boot"]["accel"] == "tcg"
        assert report["seq"] > 0 and report["copy_bytes"] > 0
        assert service.poll() is None, "the apply service was interrupted"
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
        log.close()
    assert not list(pair_dir(pair_name).glob("test-launch-*")), "the copy was left behind"
    assert _state(broker, pair_name) in ("created", "replicating")
    after = run_x2x("volume", "digest", str(target)).stdout.split()[0]
    assert after == run_x2x("volume", "digest", str(src)).stdout.split()[0] != before


def test_cutover_fails_over_and_boots_the_target(broker, pair_name, tmp_path, debian_guest):
    src, target = _pair_with_guest_disk(pair_name, tmp_path, "old")
    guest.set_token(src, "last-write")
    run_x2x("capture", pair_name, "--once")
    r = run_x2x("cutover", pair_name, *debian_guest.boot_args(), "--up-marker",
                f"{guest.MARKER} last-write", "--boot-timeout", "240", "--json",
                timeout=500)
    report = json.loads(r.stdout)
    try:
        b = report["boot"]
        assert b["up"], report
        assert report["promoted"] == str(target)
        if os.access("/dev/kvm", os.R_OK | os.W_OK) and b["accel"] == "tcg":
            assert b["fallback"], "KVM was given up without a reason"
            assert "booting again with TCG" in r.stderr
        parts = report["writes_stopped_to_promoted_s"], report["promoted_to_guest_up_s"]
        assert all(p is not None and p >= 0 for p in parts), report
        assert abs(sum(parts) - report["downtime_s"]) < 0.05, report
        assert b["boot_s"] <= report["promoted_to_guest_up_s"] + 0.5
    finally:
        if report["boot"]["pid"]:
            try:
                os.kill(report["boot"]["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert _state(broker, pair_name) == "promoted"
    print(f"cutover figures: writes stopped -> promoted {parts[0]:.2f} s, promoted -> guest "
          f"up {parts[1]:.2f} s ({b['accel']}), downtime {report['downtime_s']:.2f} s")


def test_cutover_bad_input_changes_nothing(broker, pair_name, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(4 * MiB))
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target",
            str(tmp_path / "t.qcow2"), "--create-target")

    def refused(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        p = run_x2x("cutover", pair_name, *args, check=False, env=env)
        assert p.returncode != 0, p.stdout
        assert _state(broker, pair_name) == "created", p.stderr
        return p.returncode, " ".join(p.stderr.split())

    code, err = refused("--test", "--no-boot")
    assert code == 2 and "pick one" in err
    code, err = refused("--accel", "xen")
    assert code == 2 and "--accel 'xen' is invalid" in err
    code, err = refused("--kernel", str(tmp_path / "no-such-vmlinuz"))
    assert code == 2 and "does not exist" in err
    code, err = refused(env={"PATH": str(Path(sys.executable).parent)})
    assert "needs qemu-system-x86_64" in err and "--no-boot" in err
    code, err = refused("--test", "--accel", "tcg")
    assert "holds no consistency point" in err
    run_x2x("capture", pair_name, "--once")
    # No boot loader on random bytes: the firmware finds nothing, the marker never comes.
    code, err = refused("--test", "--accel", "tcg", "--boot-timeout", "5", "--up-marker",
                        "NEVER")
    assert code == 1 and "did not come up within 5 s" in err and "copy was removed" in err
    assert not list(pair_dir(pair_name).glob("test-launch-*"))
    t0 = time.monotonic()
    out = run_x2x("cutover", pair_name, "--no-boot").stdout
    assert "writes stopped -> target promoted" in out and "not booted" in out
    assert _state(broker, pair_name) == "promoted"
    assert time.monotonic() - t0 < 120


def test_cutover_serves_the_promoted_side_and_fails_back(broker, pair_name, tmp_path,
                                                         debian_guest):
    """--serve: the guest boots from the promoted raw volume through 'x2x capture --nbd',
    here on a unix socket (QEMU on the same host), so what it writes (its ext4 mount) is
    journaled; after it stops, failback brings the old source level with only the blocks
    the guest changed."""
    src = guest.system_disk(tmp_path / "system.img", 64 * MiB, "one")
    target = tmp_path / "target.img"
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(target),
            "--create-target")
    run_x2x("capture", pair_name, "--once")
    run_x2x("apply", pair_name, "--until-caught-up")
    guest.set_token(src, "two")
    run_x2x("capture", pair_name, "--once")
    before = run_x2x("volume", "digest", str(target)).stdout.split()[0]
    sock = tmp_path / "promoted.sock"
    r = run_x2x("cutover", pair_name, "--serve", str(sock), *debian_guest.boot_args(),
                "--accel", "tcg", "--up-marker", f"{guest.MARKER} two", "--boot-timeout",
                "240", "--json", timeout=500)
    report = json.loads(r.stdout)
    capturer = int(re.search(r"\(pid (\d+), log", r.stderr).group(1))
    try:
        assert report["boot"]["up"], report
        assert sock.is_socket()
        deadline = time.monotonic() + 120           # the guest powers itself off
        while report["boot"]["pid"] and _alive(report["boot"]["pid"]):
            assert time.monotonic() < deadline, "the guest did not power off"
            time.sleep(0.5)
    finally:
        if report["boot"]["pid"] and _alive(report["boot"]["pid"]):
            os.kill(report["boot"]["pid"], signal.SIGTERM)
        os.kill(capturer, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(capturer) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not sock.exists()        # a clean stop takes its socket with it
    assert run_x2x("volume", "digest", str(target)).stdout.split()[0] != before, \
        "the guest wrote nothing through the capturer"
    out = run_x2x("pair", "failback", pair_name).stdout
    m = re.search(r"(\d+) of (\d+) blocks differ", out)
    assert m and 0 < int(m.group(1)) < int(m.group(2)) // 4, out
    assert run_x2x("volume", "digest", str(src)).stdout.split()[0] == \
        run_x2x("volume", "digest", str(target)).stdout.split()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:        # a child of ours that ended but was not reaped yet is not alive
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
