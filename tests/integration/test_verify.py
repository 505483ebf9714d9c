"""x2x pair verify [--repair]: source and target block hashes compared at one journal
point (HASHES ops read under the capturer's range locks) while replication goes on;
differing extents are listed, and --repair resends them through the journal."""
from __future__ import annotations

import os

from consumers.applier import Applier
from infra import control
from journal.pairs import PairSpec
from producers.nbd_capture import NBDCapture
from tests.conftest import make_image, run_x2x, same_bytes
from tests.integration.test_nbd_capture import run, wait_baseline

MiB = 1 << 20
BLOCK = 65536


def corrupt(path: str, offset: int, length: int = 4096) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_verify_finds_a_corrupted_target_block_and_repair_fixes_it(settings, pair_name,
                                                                    tmp_path):
    size = 32 * MiB
    src = make_image(tmp_path / "src.img", size, seed=7, data_fraction=0.5)
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    spec = PairSpec(pair_name, str(src), str(dst), BLOCK, size)
    control.create_pair(settings, spec)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0).start()
    try:
        wait_baseline(cap)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 3M 1M", "-c", "flush", cap.uri)
        cap.sync_point()
        Applier(spec, str(dst), settings).run(until_caught_up=True)
        assert same_bytes(src, dst)

        clean = run_x2x("pair", "verify", pair_name)
        assert "0 of 512 blocks differ" in clean.stdout, clean.stdout

        corrupt(str(dst), 5 * BLOCK + 100)
        corrupt(str(dst), 300 * BLOCK)
        found = run_x2x("pair", "verify", pair_name, check=False)
        assert found.returncode == 1, found.stdout + found.stderr
        assert "2 of 512 blocks differ" in found.stdout
        assert f"offset {5 * BLOCK} length {BLOCK}" in found.stdout
        assert f"offset {300 * BLOCK} length {BLOCK}" in found.stdout
        assert f"verify {pair_name} --repair" in found.stderr
        assert not same_bytes(src, dst)       # verify alone changes nothing

        fixed = run_x2x("pair", "verify", pair_name, "--repair")
        assert "2 of 512 blocks differ" in fixed.stdout and "repaired" in fixed.stdout
        # Hash map (32 B per block) + the two differing blocks, nothing more.
        assert "resent 128.0 KiB" in fixed.stdout, fixed.stdout
        assert same_bytes(src, dst)
    finally:
        cap.stop()

    # Without a live capturer the command does the capturer's part itself.
    corrupt(str(dst), 100 * BLOCK)
    fixed = run_x2x("pair", "verify", pair_name, "--repair")
    assert "1 of 512 blocks differ" in fixed.stdout, fixed.stdout
    assert same_bytes(src, dst)
    assert run_x2x("pair", "verify", pair_name).returncode == 0


def test_verify_under_concurrent_writes_compares_like_with_like(settings, pair_name,
                                                                 tmp_path):
    """HASHES are read under the writes' range locks: writes racing the verify never show
    up as differences (journal/DESIGN.md rule 9)."""
    import threading
    size = 32 * MiB
    src = make_image(tmp_path / "src.img", size, seed=8, data_fraction=0.3)
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    spec = PairSpec(pair_name, str(src), str(dst), BLOCK, size)
    control.create_pair(settings, spec)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0).start()
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            cmds = []
            for j in range(16):
                off = ((i * 16 + j) * 7919 % (size // 4096)) * 4096
                cmds += ["-c", f"write -P {(i + j) % 250 + 1} {off} 4k"]
            run("qemu-io", "-f", "raw", *cmds, "-c", "flush", cap.uri)
            i += 1
    t = threading.Thread(target=writer, daemon=True)
    try:
        wait_baseline(cap)
        cap.sync_point()
        Applier(spec, str(dst), settings).run(until_caught_up=True)
        t.start()
        out = run_x2x("pair", "verify", pair_name)
        assert "0 of 512 blocks differ" in out.stdout, out.stdout
    finally:
        stop.set()
        t.join(30)
        cap.stop()
    Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert same_bytes(src, dst)


def test_verify_with_a_running_apply_service(settings, pair_name, tmp_path):
    """The target's running applier does the comparison; verify reads its answer."""
    import signal
    import subprocess
    from tests.conftest import x2x_bin
    size = 16 * MiB
    src = make_image(tmp_path / "src.img", size, seed=9, data_fraction=0.5)
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    spec = PairSpec(pair_name, str(src), str(dst), BLOCK, size)
    control.create_pair(settings, spec)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0).start()
    apply = subprocess.Popen([x2x_bin(), "apply", pair_name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_baseline(cap)
        cap.sync_point()
        import time
        deadline = time.monotonic() + 30
        while not same_bytes(src, dst):
            assert time.monotonic() < deadline, "the apply service did not catch up"
            time.sleep(0.2)
        corrupt(str(dst), 17 * BLOCK)
        out = run_x2x("pair", "verify", pair_name, "--repair")
        assert "holds" in out.stderr and "1 of 256 blocks differ" in out.stdout, out
        assert f"offset {17 * BLOCK} length {BLOCK}" in out.stdout
        assert same_bytes(src, dst)
    finally:
        apply.send_signal(signal.SIGTERM)
        apply.wait(30)
        cap.stop()
