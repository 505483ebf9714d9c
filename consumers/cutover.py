"""Cutover: fail over to the target and boot it, or test-launch a copy while replicating.

- :func:`cutover`: the planned failover of consumers/failover.py (the source refuses
  writes and SEALs, the target drains to the SEAL, its digest is checked, it is
  promoted), then QEMU boots the promoted target (infra/qemu.py) and keeps running.
  Downtime is reported in its parts: writes stopped (the SEAL's refusal) -> target
  promoted -> guest up (the marker on its serial console).
- :func:`test_launch`: a point-in-time copy at the newest consistency point the journal
  holds, built by replaying the journal onto a thin qcow2 (the target itself is left to
  its applier: an overlay over a target that is still being written would see its base
  move under it), booted with a throw-away overlay while replication goes on; the report
  says whether the guest came up, and the copy is removed.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from consumers import failover as fo
from consumers import replica
from infra import control, images
from infra.kafka import KafkaSettings
from infra.paths import pair_dir
from infra.qemu import Boot, BootSpec, boot
from journal.clock import now_ms
from journal.errors import BadInput, JournalLost, X2XError
from journal.plans import NotReady
from journal.sequence import Limit
from schemas.cipher import JournalKey

Say = Callable[[str], None]


class GuestNotUp(X2XError):
    """The booted guest did not show its marker in time."""


@dataclass
class BootReport:
    accel: str = ""
    up: bool = False
    boot_s: float | None = None          # QEMU start -> marker
    fallback: str = ""                   # why KVM was given up
    pid: int = 0                         # the QEMU still running (cutover), else 0
    serial_log: str = ""
    serial_tail: str = ""


@dataclass
class CutoverResult:
    pair: str
    promoted: str
    epoch: int
    seq: int
    digest: str
    writes_stopped_to_promoted_s: float
    promoted_to_guest_up_s: float | None = None
    downtime_s: float | None = None     # writes stopped -> guest up (or promoted, --no-boot)
    boot: BootReport | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class TestLaunchResult:
    pair: str
    epoch: int
    seq: int
    captured_at_ms: int                  # when the source wrote that consistency point
    copy_s: float
    copy_bytes: int
    boot: BootReport = field(default_factory=BootReport)


def _report(b: Boot, keep: bool) -> BootReport:
    return BootReport(b.accel, b.up_after_s is not None, b.up_after_s, b.fallback,
                      b.pid if keep and b.proc.poll() is None else 0, str(b.serial),
                      b.serial_tail())


def cutover(op: fo.Operation, spec: BootSpec | None, marker: str, boot_timeout: float,
            serve: Callable[[], str] | None = None) -> CutoverResult:
    """Planned failover, then (unless ``spec`` is None) boot the promoted target; with
    ``serve`` the guest's disk is what it returns (the promoted volume served by an NBD
    capturer, so the new side's writes are journaled from its first one)."""
    name, say = op.pair, op.say
    st = control.get_pair(op.settings, name)
    target = st.active_spec.target
    if spec is not None:
        spec.disk = target
        spec.check()            # before anything changes: a missing qemu stops us here
    if serve is not None and images.locate(target).kind != "local":
        raise BadInput(f"--serve needs a raw file or block device target (the NBD capturer "
                       f"serves those); {target} is not one")
    r = fo.failover(op)
    stopped_ms = r.promoted_at_ms - int((r.downtime_s or 0.0) * 1000)
    out = CutoverResult(name, r.promoted, r.epoch, r.seq, r.digest, r.downtime_s or 0.0,
                        downtime_s=r.downtime_s, warnings=r.warnings)
    if spec is None:
        return out
    if serve is not None:
        spec.disk = serve()
    say(f"booting {spec.disk} with QEMU")
    b = boot(spec, pair_dir(name) / "vm", marker, boot_timeout, say)
    out.boot = _report(b, keep=True)
    if b.up_after_s is not None:
        up_ms = now_ms() - int((time.monotonic() - b.started - b.up_after_s) * 1000)
        out.promoted_to_guest_up_s = (up_ms - r.promoted_at_ms) / 1000
        out.downtime_s = (up_ms - stopped_ms) / 1000
    return out


def test_launch(settings: KafkaSettings, name: str, key: JournalKey | None, say: Say,
                spec: BootSpec, marker: str, boot_timeout: float,
                workdir: Path | None = None) -> TestLaunchResult:
    """Copy the newest consistency point, boot it with a throw-away overlay, clean up."""
    st = control.get_pair(settings, name)
    if not st.replicating:
        raise NotReady(f"pair {name} is {st.state}: a test launch copies a pair that is "
                          f"replicating ('x2x pair show {name}')")
    if not st.replayable:
        raise JournalLost(f"pair {name}: its journal lost its history, so no copy can be "
                          f"replayed from it; 'x2x pair resync {name}' and a full baseline "
                          f"('x2x capture {name} --rebaseline') first")
    pair = st.active_spec
    if replica.needs_seed(settings, st, f"{name}-test-launch"):
        raise BadInput(f"pair {name} keeps a history window and its journal no longer starts "
                       f"with the full baseline: a test launch replays the journal from its "
                       f"start, so it cannot copy this pair yet (seeding the copy from the "
                       f"history base is not done); boot a replica made with 'x2x replica add "
                       f"{name} --target COPY --at now' instead. Nothing was changed")
    work = Path(tempfile.mkdtemp(prefix="test-launch-", dir=workdir or pair_dir(name)))
    try:
        copy = images.locate(str(work / "copy.qcow2"))
        images.create(copy, pair.volume_size)
        spec.disk, spec.snapshot = copy.text, True
        spec.check()
        say(f"copying the newest consistency point of {name} to {copy.path}")
        t0 = time.monotonic()
        applier = Applier(pair, copy.text, settings, key=key, publish_status=False,
                          store=CheckpointStore(name, copy.text, directory=work),
                          limit=Limit(at_ms=now_ms()))
        stats = applier.run()
        p = applier.checkpointed
        if p.seq == 0:
            raise X2XError(f"pair {name}: the journal holds no consistency point yet; "
                           f"capture the source first")
        result = TestLaunchResult(name, p.epoch, p.seq, p.captured_at_ms,
                                  time.monotonic() - t0, stats.bytes_applied)
        say(f"booting the copy at epoch {p.epoch} seq {p.seq} (replication goes on)")
        b = boot(spec, work, marker, boot_timeout, say)
        try:
            result.boot = _report(b, keep=False)
        finally:
            b.stop()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
