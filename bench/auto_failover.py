"""Scenario: automatic failover. A client writes through the NBD capture (async mode, a
flush after each 4 KiB block) while ``x2x watch`` follows on the target side; the
capturer is killed (SIGKILL, the source host lost). Measured: the time from the failure
to the promoted target (detection + promotion) next to the configured ``--after``, and
the RPO the failover reported next to the one measured against the source's own last
acknowledged write (the newest block the target lacks)."""
from __future__ import annotations

import re
import signal
import subprocess
import time
from typing import Any

from bench.common import (Context, empty_image, figure, finish, make_pair, require, start,
                          x2x_cmd)
from infra.net import free_port, port_open

TITLE = "Automatic failover: failure -> promoted target, and the RPO it reports"
BLOCK = 4096


def _write(uri: str, i: int) -> bool:
    p = subprocess.run(["qemu-io", "-f", "raw", "-c",
                        f"write -P {i % 250 + 1} {i * BLOCK} {BLOCK}", "-c", "flush", uri],
                       capture_output=True, text=True, timeout=60)
    return p.returncode == 0 and "error" not in (p.stdout + p.stderr).lower()


def run(ctx: Context) -> dict[str, Any]:
    from infra import control
    missing = require("qemu-io")
    if missing:
        return {"title": TITLE, "skipped": missing}
    after_s = ctx.size(10, 6)
    writes_s = ctx.size(10, 4)
    d = ctx.dir("auto_failover")
    size = 16 << 20
    src = empty_image(d / "src.img", size)
    spec = make_pair(ctx, "auto_failover", src, d / "dst.img")
    subprocess.run([*x2x_cmd(), "pair", "auto-failover", spec.name, "--after",
                    f"{after_s}s"], check=True, capture_output=True)
    port = free_port()
    cap = start([*x2x_cmd(), "capture", spec.name, "--nbd", f"127.0.0.1:{port}"])
    watcher = start([*x2x_cmd(), "watch", spec.name])
    uri = f"nbd://127.0.0.1:{port}/{spec.name}"
    acked: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not port_open(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        t_end = time.monotonic() + writes_s
        while time.monotonic() < t_end:
            if _write(uri, len(acked)):
                acked.append(time.monotonic())
        cap.send_signal(signal.SIGKILL)
        failed = time.monotonic()
        deadline = failed + after_s + 120
        while control.get_pair(ctx.settings, spec.name).state != "promoted":
            if time.monotonic() > deadline:
                raise RuntimeError("the target was not promoted")
            time.sleep(0.1)
        promoted = time.monotonic()
    finally:
        cap.send_signal(signal.SIGKILL)
        finish(cap, ctx, "capturer", "auto_failover")
        watcher.send_signal(signal.SIGTERM)
        said = finish(watcher, ctx, "watcher", "auto_failover").stdout
    data = open(spec.target, "rb").read()
    present = sum(1 for i in range(len(acked)) if data[i * BLOCK] == i % 250 + 1)
    # The source's own view: its last acknowledged write against the newest the target
    # has; every acknowledged write after that one is lost.
    measured = acked[-1] - acked[present - 1] if 0 < present < len(acked) else 0.0
    reported = control.get_pair(ctx.settings, spec.name).promotion.rpo_s
    m = re.search(r"RPO bound: at most ([0-9.]+) s", said)
    bound = float(m.group(1)) if m else None
    figures = [figure("failure -> promoted target", "s", promoted - failed,
                      "the configured --after", after_s, "lower")]
    if measured > 0 and bound is not None:      # nothing lost: no ratio to show
        figures.append(figure("RPO bound reported by the failover", "s", bound,
                              "RPO measured (the source's last acknowledged write)",
                              measured, "lower"))
    return {"title": TITLE,
            "sizes": {"after_s": after_s, "writes": len(acked), "on_target": present,
                      "rpo_reported_s": reported, "rpo_bound_s": bound,
                      "rpo_measured_s": round(measured, 3)},
            "figures": figures}
