"""CPU accounting for the benchmarks: on a small machine the CPU a run takes, and who on
the machine took it, decide who is faster, so a scenario can say what bounds it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
#: Processes named by their command when no role is given for their pid.
_BY_COMMAND = {"java": "broker", "nbdfuse": "nbdfuse", "postgres": "postgres",
               "pgbench": "postgres"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process (all its threads) has used so far."""
    return _of_stat(Path(f"/proc/{pid}/stat").read_text())


def _of_stat(stat: str) -> float:
    """utime + stime of a /proc/PID/stat line (fields 14 and 15; the command before
    them, in parentheses, may hold spaces)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Snapshot:
    """Every process's CPU seconds at one moment, and the machine's."""

    procs: dict[int, tuple[str, float]]     # pid -> (what it runs, CPU seconds)
    busy: float                             # all CPUs: seconds neither idle nor waiting
    total: float                            # all CPUs: seconds


def snapshot() -> Snapshot:
    procs: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:         # gone meanwhile
            continue
        # No command line: a kernel thread (writeback, block completions, softirqs). A
        # PostgreSQL backend's reads "postgres: user db [local] ...".
        what = (os.path.basename(argv.decode(errors="replace").split(" ")[0]).rstrip(":")
                if argv else "kernel")
        procs[int(entry)] = (what, _of_stat(stat))
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]          # idle, iowait
    return Snapshot(procs, (sum(ticks) - idle) / _TICK, sum(ticks) / _TICK)


def by_role(before: Snapshot, after: Snapshot, roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds each role took between two snapshots: ``roles`` names processes by pid,
    the others are named by their command (the broker's JVM, nbdfuse, PostgreSQL, the
    kernel's threads) or counted as "other"; "machine" is all CPUs' busy time, which
    also holds what processes that ended meanwhile took (pgbench and its backends)."""
    out: dict[str, float] = {}
    for pid, (what, seconds) in after.procs.items():
        then = before.procs.get(pid)
        spent = seconds - (then[1] if then and then[0] == what else 0.0)
        role = roles.get(pid) or _BY_COMMAND.get(what) or (
            "kernel" if what == "kernel" else "other")
        out[role] = out.get(role, 0.0) + spent
    out["machine"] = after.busy - before.busy
    return out


def machine_share(before: Snapshot, after: Snapshot) -> float:
    """How busy all CPUs were between two snapshots (0..1)."""
    return (after.busy - before.busy) / max(after.total - before.total, 1e-9)
