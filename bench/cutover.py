"""Scenario: cutover of a small Debian guest (tests/guest.py) replicated to a qcow2.

x2x: `x2x cutover` (SEAL, drain, digest check, promote, then QEMU boots the qcow2 target
until the guest's marker is on its serial console), its downtime in parts. Peer: the
offline way to the same place, stopping the workload, converting its disk to qcow2 with
``qemu-img convert`` and booting that with the same QEMU. Both boot with TCG, so the
figures compare on hosts with and without a working KVM.
"""
from __future__ import annotations

import json
import time
from typing import Any

from bench.common import GiB, MiB, Context, figure, require, run_x2x, timed_run

TITLE = "Cutover downtime to a booted guest: x2x cutover vs offline qemu-img convert + boot"


def run(ctx: Context) -> dict[str, Any]:
    from infra.qemu import BootSpec, boot
    from tests import guest
    if reason := (guest.missing() or require("qemu-img", "qemu-nbd")):
        return {"skipped": reason}
    size, payload = ctx.size(1 * GiB, 64 * MiB), ctx.size(256 * MiB, 8 * MiB)
    d = ctx.dir("cutover")
    g = guest.build(d / "guest")
    src = guest.system_disk(d / "system.img", size, "bench", payload)
    name = ctx.pair_name("cutover")
    target = d / "target.qcow2"
    run_x2x(ctx, "pair", "create", name, "--source", str(src), "--target", str(target),
            "--create-target")
    run_x2x(ctx, "capture", name, "--once", role="capturer", scenario="cutover")
    run_x2x(ctx, "apply", name, "--until-caught-up", role="applier", scenario="cutover")
    res = run_x2x(ctx, "cutover", name, *g.boot_args(), "--accel", "tcg", "--up-marker",
                  f"{guest.MARKER} bench", "--json", role="cutover", scenario="cutover")
    x = json.loads(res.stdout)
    if not x["boot"]["up"]:
        raise RuntimeError(f"the cutover guest did not come up: {x['boot']['serial_tail']}")

    peer_img = d / "offline.qcow2"
    convert_s, _ = timed_run("qemu-img", "convert", "-O", "qcow2", str(src), str(peer_img))
    b = boot(BootSpec(str(peer_img), str(g.kernel), str(g.initrd), "console=ttyS0 panic=-1 "
                      "quiet", accel="tcg"), d / "offline-vm", f"{guest.MARKER} bench", 300,
             lambda _msg: None)
    b.stop()
    if b.up_after_s is None:
        raise RuntimeError(f"the offline guest did not come up: {b.serial_tail()}")
    peer_down = convert_s + b.up_after_s
    offline = "offline: qemu-img convert + boot"
    return {
        "title": TITLE,
        "sizes": {"disk_bytes": size, "payload_bytes": payload},
        "figures": [
            figure("downtime: writes stopped -> guest up", "s", x["downtime_s"], offline,
                   peer_down, "lower"),
            figure("writes stopped -> target ready", "s", x["writes_stopped_to_promoted_s"],
                   "qemu-img convert to qcow2", convert_s, "lower"),
            figure("target ready -> guest up (TCG)", "s", x["promoted_to_guest_up_s"],
                   "boot of the converted image", b.up_after_s, "lower"),
        ],
        "details": {"x2x": x, "offline": {"convert_s": convert_s, "boot_s": b.up_after_s}},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
