"""A full disk under the capturer's state directory stops it loudly.

The capturer's X2X_HOME is a small tmpfs of the test's own; once the capturer runs, the
tmpfs is filled, and the next save of its state (the tick thread keeps the newest
acknowledged record in it) fails with ENOSPC. The capturer must not serve on without
heartbeats, stall detection and recovery: it logs what failed and exits non-zero, so that
its service manager restarts it.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.faults.conftest import MiB, Proc, need
from tests.faults.test_process_kills import start_capturer
from tests.integration.test_nbd_capture import make_pair, wait_beat

pytestmark = pytest.mark.timeout(180)


def _fill(path: str) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * MiB)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_under_the_state_directory_stops_the_capturer(settings, pair_name,
                                                                  tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as the capturer's X2X_HOME")
    need("qemu-io")
    home = tmp_path / "small-home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(home)], check=True)
    cap: Proc | None = None
    try:
        make_pair(settings, pair_name, tmp_path, 4 * MiB, seed=41, data_fraction=0.5)
        cap = start_capturer(pair_name, env={"X2X_HOME": str(home)})
        wait_beat(settings, pair_name, lambda b: b.detail.get("baseline") == "done")
        _fill(str(home / "filler"))
        # Writes go on being journaled; the capturer's own state can no longer be saved.
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "flush",
                        cap.uri], capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while cap.proc.poll() is None:
            assert time.monotonic() < deadline, "the capturer kept serving on a full disk:\n" \
                + cap.stderr()
            time.sleep(0.2)
        cap.kill()
        err = cap.stderr()
        assert cap.proc.returncode != 0, err
        assert "No space left on device" in err, err
        assert "stopping the capturer" in err and "failed" in err, err
        assert "Traceback" not in err.split("CRITICAL")[0], err
    finally:
        if cap is not None:
            cap.kill()
        subprocess.run(["umount", "-l", str(home)], check=False)
