"""Booting a volume with QEMU: the last step of a cutover, and a test launch.

The volume is the guest's first virtio disk, wherever it lives (infra/images.py: a raw
file or device, an image in its format, an NBD URI). Without ``kernel`` the firmware
boots the disk; with it QEMU boots that kernel and initrd directly (guests whose boot
loader is elsewhere, and the tests' small Debian guest). The serial console goes to a
file, and the guest counts as up when ``marker`` appears there.

Acceleration: ``auto`` uses KVM where /dev/kvm is usable and falls back to TCG when QEMU
fails with it (some hosts refuse MSRs, or a nested KVM hangs the guest): QEMU exiting
with an error, or no serial output within ``kvm_grace`` seconds. A guest that writes
nothing to its serial console therefore boots with TCG under ``auto``; ``kvm`` forces it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from infra.images import Location, locate
from journal.errors import BadInput, VolumeError

ACCELS = ("auto", "kvm", "tcg")
Say = Callable[[str], None]


@dataclass
class BootSpec:
    """How to boot: the disk and what QEMU needs besides it."""

    disk: str
    kernel: str = ""
    initrd: str = ""
    append: str = ""
    memory_mib: int = 1024
    cpus: int = 1
    accel: str = "auto"
    snapshot: bool = False        # the guest's writes go to a temporary overlay

    def check(self) -> None:
        if self.accel not in ACCELS:
            raise BadInput(f"--accel {self.accel!r} is invalid: use auto (KVM, else TCG), kvm "
                           f"or tcg")
        if shutil.which("qemu-system-x86_64") is None:
            raise VolumeError("booting needs qemu-system-x86_64, which is not installed: "
                              "apt-get install qemu-system-x86 (or use --no-boot)")
        for what, path in (("--kernel", self.kernel), ("--initrd", self.initrd)):
            if path and not os.path.isfile(path):
                raise BadInput(f"{what} {path} does not exist")
        if self.initrd and not self.kernel:
            raise BadInput("--initrd needs --kernel")
        if self.disk.startswith("nbds"):
            raise BadInput(f"QEMU reaches {self.disk.split('?')[0]} only with a TLS object "
                           f"of its own; boot it yourself (--no-boot)")


@dataclass
class Boot:
    """A started guest: its QEMU process, serial log, and what the boot found."""

    proc: subprocess.Popen
    accel: str
    serial: Path
    started: float                 # time.monotonic() at the start of QEMU
    up_after_s: float | None = None
    fallback: str = ""             # why KVM was given up, if it was
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def serial_tail(self, lines: int = 15) -> str:
        try:
            text = self.serial.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _drive(loc: Location, snapshot: bool) -> str:
    fmt = "raw" if loc.kind in ("local", "nbd") else loc.fmt
    opts = f"file={loc.path},format={fmt},if=virtio"
    return opts + (",snapshot=on" if snapshot else "")


def command(spec: BootSpec, accel: str, serial: Path) -> list[str]:
    loc = locate(spec.disk)
    cmd = ["qemu-system-x86_64", "-accel", accel, "-m", str(spec.memory_mib),
           "-smp", str(spec.cpus), "-display", "none", "-no-reboot", "-nodefaults",
           "-serial", f"file:{serial}", "-drive", _drive(loc, spec.snapshot)]
    if spec.kernel:
        cmd += ["-kernel", spec.kernel]
        if spec.initrd:
            cmd += ["-initrd", spec.initrd]
        if spec.append:
            cmd += ["-append", spec.append]
    return cmd


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _start(spec: BootSpec, accel: str, workdir: Path) -> Boot:
    serial = workdir / f"serial-{accel}.log"
    serial.unlink(missing_ok=True)
    log = open(workdir / f"qemu-{accel}.log", "w")
    proc = subprocess.Popen(command(spec, accel, serial), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return Boot(proc, accel, serial, time.monotonic())


def _qemu_error(workdir: Path, accel: str) -> str:
    try:
        lines = [ln for ln in (workdir / f"qemu-{accel}.log").read_text().splitlines()
                 if "error" in ln.lower() or "assert" in ln.lower()]
    except OSError:
        lines = []
    return lines[-1].strip() if lines else "QEMU exited"


def boot(spec: BootSpec, workdir: Path, marker: str, timeout: float, say: Say,
         kvm_grace: float = 15.0) -> Boot:
    """Start the guest and wait until ``marker`` is on its serial console, QEMU ends, or
    ``timeout``; returns the running (or ended) boot, ``up_after_s`` set if it came up."""
    spec.check()
    workdir.mkdir(parents=True, exist_ok=True)
    accel = spec.accel
    if accel == "auto":
        accel = "kvm" if _kvm_usable() else "tcg"
        if accel == "tcg":
            say("no usable /dev/kvm: booting with TCG (emulation, slower)")
    b = _start(spec, accel, workdir)
    grace = kvm_grace if spec.accel == "auto" and accel == "kvm" else None
    reason = _wait(b, marker, timeout, grace)
    if reason is not None:
        b.stop()
        say(f"KVM did not work here ({reason}): booting again with TCG (emulation, slower)")
        tcg = _start(spec, "tcg", workdir)
        tcg.fallback, tcg.started = reason, b.started
        _wait(tcg, marker, timeout - (time.monotonic() - b.started), None)
        return tcg
    return b


def _wait(b: Boot, marker: str, timeout: float, grace: float | None) -> str | None:
    """Wait for the marker; a reason to give KVM up (only with ``grace``), else None."""
    deadline = time.monotonic() + max(timeout, 0.0)
    needle = marker.encode()
    while time.monotonic() < deadline:
        try:
            data = b.serial.read_bytes()
        except OSError:
            data = b""
        if needle in data:
            b.up_after_s = time.monotonic() - b.started
            return None
        if b.proc.poll() is not None:
            if grace is not None and b.proc.returncode != 0:
                return _qemu_error(b.serial.parent, b.accel)
            return None
        if grace is not None and not data and time.monotonic() - b.started > grace:
            return f"no output on the serial console within {grace:.0f} s"
        time.sleep(0.1)
    return None
