"""x2x cutover: fail over to the target and boot it, or --test a copy while replicating.
The steps live in consumers/cutover.py; this parses and prints."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict

import typer

from cli.common import console, err_console, human_bytes, print_json
from cli.pair import operation, say
from consumers import cutover as co
from infra import control
from infra.qemu import BootSpec
from journal.groups import check_alone
from infra.paths import pair_dir
from journal.errors import BadInput, BrokerError
from producers.nbd_capture import Listen, parse_listen


def cutover(ctx: typer.Context, name: str,
            test: bool = typer.Option(False, "--test", help="Test launch: boot a copy of the "
                                      "newest consistency point while replication goes on, "
                                      "report whether the guest came up, clean up."),
            no_boot: bool = typer.Option(False, "--no-boot", help="Fail over only; boot the "
                                         "target yourself."),
            kernel: str = typer.Option(None, help="Boot this kernel directly (default: the "
                                       "disk's own boot loader through the firmware)."),
            initrd: str = typer.Option(None, help="With --kernel: its initramfs."),
            append: str = typer.Option(None, help="With --kernel: its command line."),
            memory: int = typer.Option(1024, help="Guest memory in MiB."),
            cpus: int = typer.Option(1, help="Guest vCPUs."),
            accel: str = typer.Option("auto", metavar="auto|kvm|tcg", help="auto: KVM where "
                                      "it works, else TCG (emulation)."),
            serve: str = typer.Option(None, "--serve", metavar="[HOST:]PORT|PATH",
                                      help="Boot the guest from the promoted volume served "
                                      "by 'x2x capture NAME --nbd [HOST:]PORT|PATH' (started "
                                      "here, left running), so its writes are journaled "
                                      "for failback from the first one. Raw file or "
                                      "device targets."),
            up_marker: str = typer.Option("login:", help="Text on the guest's serial console "
                                          "that means it is up."),
            boot_timeout: float = typer.Option(300.0, help="Seconds to wait for the marker."),
            key_file: str = typer.Option(None, help="The pair's key file, if encrypted."),
            timeout: float = typer.Option(300.0, help="Seconds to wait for each failover "
                                          "step."),
            json_: bool = typer.Option(False, "--json")) -> None:
    """Move the workload to the target: planned failover (SEAL, drain, digest check), then
    boot the target with QEMU, reporting the downtime in its parts."""
    if test and no_boot:
        raise BadInput("--test boots a copy; --no-boot boots nothing: pick one")
    op = operation(ctx, name, key_file, timeout)
    if not test:
        st = control.get_pair(op.settings, name)
        check_alone(st, "x2x cutover", f"x2x group failover {st.group}, then boot its disks")
    spec = None if no_boot else BootSpec("", kernel or "", initrd or "", append or "",
                                         memory, cpus, accel)
    if test:
        r = co.test_launch(op.settings, name, op.key, say, spec, up_marker, boot_timeout)
        _print_test(r, json_)
        if not r.boot.up:
            raise co.GuestNotUp(f"pair {name}: the test launch did not come up within "
                                f"{boot_timeout:.0f} s (no {up_marker!r} on its serial "
                                f"console); the copy was removed, replication goes on")
        return
    if serve is not None:
        if no_boot:
            raise BadInput("--serve boots the guest from the capturer's export; --no-boot "
                           "boots nothing: pick one")
        listen = parse_listen(serve)
    r = co.cutover(op, spec, up_marker, boot_timeout,
                   serve=(lambda: _serve(ctx, name, listen, key_file)) if serve else None)
    _print_cutover(r, json_)
    if r.boot is not None and not r.boot.up:
        raise co.GuestNotUp(f"pair {name}: the target is promoted, but the guest did not show "
                            f"{up_marker!r} within {boot_timeout:.0f} s; QEMU "
                            + (f"is still running (pid {r.boot.pid})" if r.boot.pid
                               else "ended") + f", serial console in {r.boot.serial_log}")


def _serve(ctx: typer.Context, name: str, listen: Listen,
           key_file: str | None) -> str:
    """Start 'x2x capture NAME --nbd HOST:PORT|PATH' for the promoted side, detached (it keeps
    serving the guest after this command ends), with this command's broker options; its
    NBD URI once it serves."""
    log_path = pair_dir(name) / "vm" / "capture.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    g = ctx.find_root().obj
    args = [sys.executable, "-m", "cli"]
    for option, value in (("--bootstrap", g.bootstrap), ("--kafka-config", g.kafka_config),
                          ("--compression", g.compression)):
        if value:
            args += [option, value]
    args += ["capture", name, "--nbd", str(listen)]
    if key_file:
        args += ["--key-file", key_file]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "serving" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BrokerError(f"pair {name}: the capturer of the promoted side did not start "
                              f"serving: {log_path.read_text()[-1000:]}")
        time.sleep(0.1)
    say(f"the promoted side is served by 'x2x capture {name}' (pid {proc.pid}, log "
         f"{log_path})")
    return listen.uri(name)


def _print_test(r: co.TestLaunchResult, json_: bool) -> None:
    if json_:
        print_json(asdict(r))
        return
    b = r.boot
    console.print(f"test launch of {r.pair}: copy of epoch {r.epoch} seq {r.seq} "
                  f"({human_bytes(r.copy_bytes)} in {r.copy_s:.1f} s)", highlight=False)
    _print_boot(b)
    console.print("the copy was removed; replication was not interrupted", highlight=False)


def _print_boot(b: co.BootReport) -> None:
    how = b.accel.upper() + (f" (KVM given up: {b.fallback})" if b.fallback else "")
    if b.up:
        console.print(f"guest up after {b.boot_s:.1f} s with {how}", highlight=False)
    else:
        console.print(f"guest NOT up ({how}); last lines of its serial console:\n"
                      f"{b.serial_tail}", highlight=False)


def _print_cutover(r: co.CutoverResult, json_: bool) -> None:
    if json_:
        print_json(asdict(r))
        return
    for w in r.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"promoted {r.promoted} at epoch {r.epoch} seq {r.seq}; digest verified "
                  f"{r.digest[:16]}...; RPO 0", highlight=False)
    console.print(f"writes stopped -> target promoted: {r.writes_stopped_to_promoted_s:.2f} s",
                  highlight=False)
    if r.boot is None:
        console.print(f"not booted (--no-boot): boot {r.promoted} yourself", highlight=False)
        return
    if r.promoted_to_guest_up_s is not None:
        console.print(f"target promoted -> guest up: {r.promoted_to_guest_up_s:.2f} s",
                      highlight=False)
        console.print(f"downtime (writes stopped -> guest up): {r.downtime_s:.2f} s",
                      highlight=False)
    _print_boot(r.boot)
    if r.boot.pid:
        console.print(f"the guest runs in QEMU pid {r.boot.pid}; serial console: "
                      f"{r.boot.serial_log}", highlight=False)
