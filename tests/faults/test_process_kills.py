"""SIGKILL the services in the middle of real work; the target must still converge.

* The NBD capturer, killed while qemu-io / nbdcopy write through it: the restart resends
  exactly what the write-intent bitmap marks (less than the volume), and the target ends
  equal to the source.
* The applier (``x2x apply NAME`` as a child process), killed at random moments at least
  20 times while a capturer keeps journaling: checkpoint-after-fsync plus idempotent
  replay bring the target to the source.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import free_port, noise_file, run_x2x
from tests.faults.conftest import TALLY, MiB, Proc, converged, need
from tests.integration.test_nbd_capture import baseline_journaled, make_pair, wait_beat


def qemu_io_writes(uri: str, rng: random.Random, size: int, count: int,
                   flush_every: int = 0, noise: Path | None = None) -> list[str]:
    """``count`` writes at random places: one byte repeated (journaled as FILL ops), or,
    for every other one when ``noise`` (a MiB of random bytes) is given, data."""
    args = ["qemu-io", "-f", "raw"]
    for i in range(count):
        length = rng.choice([4096, 65536, 200 * 1024, 1 * MiB])
        off = rng.randrange(0, size - length) // 512 * 512
        what = f"-s {noise}" if noise and i % 2 else f"-P {rng.randrange(1, 255)}"
        args += ["-c", f"write {what} {off} {length}"]
        if flush_every and i % flush_every == flush_every - 1:
            args += ["-c", "flush"]
    return args + [uri]


def start_capturer(name: str, *extra: str, env: dict[str, str] | None = None,
                   verbose: bool = False) -> Proc:
    port = free_port()
    cap = Proc(*(["-v"] if verbose else []), "capture", name, "--nbd", f"127.0.0.1:{port}",
               *extra, env=env, banner="serving")
    cap.uri = f"nbd://127.0.0.1:{port}/{name}"
    return cap


def test_capturer_sigkill_mid_workload_resends_the_marked_extents(settings, pair_name,
                                                                  tmp_path):
    need("qemu-io", "nbdcopy")
    size = 64 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size, seed=11, data_fraction=0.3)
    noise = noise_file(tmp_path / "noise")
    rng = random.Random(1234)
    cap = start_capturer(pair_name)
    epoch = 1
    resent: list[int] = []
    try:
        wait_beat(settings, pair_name, baseline_journaled)
        for round_ in range(3):
            if round_ == 1:
                # A bulk writer: nbdcopy of random data over the first 24 MiB.
                blob = tmp_path / "blob.img"
                blob.write_bytes(os.urandom(24 * MiB))
                writer = subprocess.Popen(["nbdcopy", str(blob), cap.uri],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                writer = subprocess.Popen(qemu_io_writes(cap.uri, rng, size, 3000, 100,
                                                         noise),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 1.2))
            cap.proc.send_signal(signal.SIGKILL)      # mid-workload: no stop, no FLUSH
            cap.kill()
            writer.wait(30)
            TALLY["capturer kills"] += 1
            epoch += 1
            cap = start_capturer(pair_name)
            m = re.search(rf"epoch {epoch} from seq 1 \(new epoch, resending (\d+) marked",
                          cap.banner)
            assert m, cap.banner
            resent.append(int(m.group(1)))
            wait_beat(settings, pair_name,
                      lambda b: b.epoch == epoch and b.detail.get("resend") == "done")
        # A last workload that completes, then a clean stop.
        out = subprocess.run(qemu_io_writes(cap.uri, rng, size, 50, 10, noise), text=True,
                             capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "stopped (clean)" in cap.stop()
    finally:
        cap.kill()
    # The bitmap bounded every resend: never the whole volume.
    assert all(0 <= n < size for n in resent) and any(resent), resent
    print(f"capturer restarts resent {resent} bytes of a {size}-byte volume")
    run_x2x("apply", pair_name, "--until-caught-up")
    assert converged(spec.source, spec.target)


def test_applier_sigkill_loop_converges(settings, pair_name, tmp_path):
    need("qemu-io")
    size = 32 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size, seed=12, data_fraction=0.5)
    noise = noise_file(tmp_path / "noise")
    rng = random.Random(99)
    cap = start_capturer(pair_name)
    stop = threading.Event()
    failures: list[str] = []

    def workload() -> None:
        wrng = random.Random(7)
        while not stop.is_set():
            p = subprocess.run(qemu_io_writes(cap.uri, wrng, size, 40, 8, noise), text=True,
                               capture_output=True, timeout=120)
            if p.returncode != 0:
                failures.append(p.stderr)
                return

    writer = threading.Thread(target=workload, daemon=True)
    kills = 0
    try:
        writer.start()
        while kills < 22:
            app = Proc("apply", pair_name)
            time.sleep(rng.uniform(0.3, 2.5))
            assert app.proc.poll() is None, f"the applier exited by itself:\n{app.stderr()}"
            app.proc.send_signal(signal.SIGKILL)
            app.kill()
            kills += 1
            TALLY["applier kills"] += 1
        stop.set()
        writer.join(120)
        assert not failures, failures[0]
        assert "stopped (clean)" in cap.stop()
    finally:
        stop.set()
        cap.kill()
    run_x2x("apply", pair_name, "--until-caught-up")
    assert converged(spec.source, spec.target)
