"""A private tracefs instance that reports every completed request of one block device.

``instances/NAME`` of tracefs is a trace buffer of its own: x2x enables
``block:block_rq_complete`` and ``block:block_bio_complete`` there, filtered by the
device's number (``dev == MKDEV(major, minor)``, the kernel's 20-bit minor encoding), so
nothing else on the machine is traced and no other tracer is disturbed. The capturer
reads ``trace_pipe`` without blocking; journal/tracemarks.py parses it.

Lost events are never silent: :meth:`BlockTrace.lost` sums ``overrun``, ``commit
overrun`` and ``dropped events`` of every CPU's stats (the buffer was full), and a
vanished instance (someone removed it) raises :class:`TraceLost`. Markers written to ``trace_marker`` come back in
``trace_pipe`` after every event recorded before them: :meth:`BlockTrace.read_until`
reads up to one, which is how a consistency cut knows it has every write completed
before the filesystem was frozen.
"""
from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

from journal.errors import X2XError

DEFAULT_ROOT = Path("/sys/kernel/tracing")
EVENTS = ("block_rq_complete", "block_bio_complete")


class TraceError(X2XError):
    """Block tracepoints cannot be used here (no tracefs, no permission, no events)."""


class TraceLost(TraceError):
    """The trace instance vanished: events of the device were lost."""


def _mounted_tracefs() -> Path | None:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "tracefs":
                return Path(fields[4])
    return None


def tracefs_root() -> Path:
    """Where tracefs is mounted (``X2X_TRACEFS`` overrides), mounting it at
    /sys/kernel/tracing when it is not mounted anywhere."""
    forced = os.environ.get("X2X_TRACEFS")
    if forced:
        root = Path(forced)
        if not (root / "instances").is_dir():
            raise TraceError(f"X2X_TRACEFS={forced} is not a tracefs mount (no instances/)")
        return root
    root = _mounted_tracefs()
    if root is not None:
        return root
    r = subprocess.run(["mount", "-t", "tracefs", "nodev", str(DEFAULT_ROOT)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise TraceError(f"tracefs is not mounted and mounting it on {DEFAULT_ROOT} failed: "
                         f"{r.stderr.strip()}; --trace needs root and a kernel with "
                         f"CONFIG_FTRACE (mount -t tracefs nodev {DEFAULT_ROOT})")
    return DEFAULT_ROOT


def traced_device(rdev: int) -> tuple[int, int]:
    """(device whose requests to trace, byte offset of ``rdev`` in it). Requests of a
    partition complete on its whole disk, at the disk's sectors: a partition is traced
    on its disk, and its events are shifted by its start (sysfs ``start``, 512-byte
    sectors)."""
    sys = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    try:
        start = int((sys / "start").read_text())
        major, minor = (sys.resolve().parent / "dev").read_text().split(":")
    except (OSError, ValueError):
        return rdev, 0              # not a partition
    return os.makedev(int(major), int(minor)), start * 512


def kernel_dev(rdev: int) -> int:
    """``st_rdev`` as the kernel's dev_t in tracepoints: major << 20 | minor."""
    return os.major(rdev) << 20 | os.minor(rdev)


class BlockTrace:
    """The completed requests of one device, in a tracefs instance of our own."""

    def __init__(self, rdev: int, name: str, buffer_kb: int = 4096,
                 root: Path | None = None) -> None:
        self.rdev, self.buffer_kb = rdev, buffer_kb
        self.root = root or tracefs_root()
        self.dir = self.root / "instances" / name
        self.fd = -1
        self._lost_base = 0

    def open(self) -> "BlockTrace":
        """Create the instance (replacing a stale one of the same name), filter, enable."""
        if not (self.root / "events" / "block" / "block_rq_complete").is_dir():
            raise TraceError(f"{self.root} has no block:block_rq_complete tracepoint "
                             f"(kernel without CONFIG_BLK_DEV_IO_TRACE?)")
        if self.dir.exists():
            self.close_instance()
        try:
            self.dir.mkdir()
        except OSError as e:
            raise TraceError(f"cannot create the trace instance {self.dir}: {e.strerror}"
                             ) from None
        try:
            self._write("buffer_size_kb", str(self.buffer_kb))
            # One clock for every CPU: a marker then follows every event recorded before it.
            self._write("trace_clock", "global")
            for event in EVENTS:
                ev = self.dir / "events" / "block" / event
                if ev.is_dir():
                    (ev / "filter").write_text(f"dev == {kernel_dev(self.rdev)}")
                    (ev / "enable").write_text("1")
            self._write("tracing_on", "1")
            self.fd = os.open(self.dir / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            self.close_instance()
            raise TraceError(f"cannot set up the trace instance {self.dir}: {e}") from None
        self._lost_base = self._lost_now()
        return self

    def _write(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value)

    def read(self, limit: int = 64 << 20) -> bytes:
        """Whatever the buffer holds now (up to ``limit`` bytes), without waiting."""
        out = []
        total = 0
        while total < limit:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    break
                self._check_alive()
                raise TraceLost(f"reading {self.dir}/trace_pipe failed: {e.strerror}"
                                ) from None
            if not chunk:
                break
            out.append(chunk)
            total += len(chunk)
        if not out:
            self._check_alive()
        return b"".join(out)

    def mark(self, text: str) -> bytes:
        """Write ``text`` as a marker into the buffer; the bytes to look for."""
        try:
            with open(self.dir / "trace_marker", "w") as f:
                f.write(text)
        except OSError as e:
            self._check_alive()
            raise TraceError(f"cannot write {self.dir}/trace_marker: {e.strerror}") from None
        return text.encode()

    def read_until(self, marker: bytes, timeout: float = 1.0) -> tuple[bytes, bool]:
        """Read until ``marker`` came through; (text, found). Not found within
        ``timeout``: the caller must treat events as possibly lost."""
        deadline = time.monotonic() + timeout
        data = bytearray()
        while True:
            start = max(0, len(data) - len(marker))
            chunk = self.read()
            data += chunk
            if marker in data[start:]:
                return bytes(data), True
            if time.monotonic() > deadline:
                return bytes(data), False
            if not chunk:
                time.sleep(0.0005)

    def _check_alive(self) -> None:
        if not (self.dir / "trace_pipe").exists():
            raise TraceLost(f"the trace instance {self.dir} was removed")

    def _lost_now(self) -> int:
        lost = 0
        try:
            for stats in (self.dir / "per_cpu").glob("cpu*/stats"):
                for line in stats.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() in ("overrun", "commit overrun", "dropped events"):
                        lost += int(value.strip() or 0)
        except OSError:
            self._check_alive()
            raise
        return lost

    def lost(self) -> int:
        """Events lost (buffer overrun or dropped) since :meth:`open` or the last call
        that returned more than zero."""
        now = self._lost_now()
        lost, self._lost_base = now - self._lost_base, now
        return max(lost, 0)

    def close_instance(self) -> None:
        """Disable the events and remove the instance (best effort)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self._write("tracing_on", "0")
        except OSError:
            pass
        for event in EVENTS:
            try:
                (self.dir / "events" / "block" / event / "enable").write_text("0")
            except OSError:
                pass
        try:
            self.dir.rmdir()
        except OSError:
            pass

    close = close_instance
