"""Freezing a filesystem for a consistency cut (FIFREEZE/FITHAW), never for long.

FIFREEZE on any fd of a mounted filesystem writes back its dirty data, waits for every
write in flight, makes its journal clean and blocks new writes until FITHAW: the device
then holds a consistent filesystem and nothing changes it.

A frozen filesystem must never be left frozen. Three layers:

1. the capturer abandons a cut (thaws, appends no FLUSH) once it took ``cap`` seconds;
2. a **watchdog child** (``python -m infra.freeze MOUNTPOINT CAP``, its own session, so a
   Ctrl-C or a group kill of the capturer does not reach it) is told ``F`` before each
   freeze and ``T`` after each thaw on a pipe. It thaws the filesystem itself when a
   freeze lasts ``cap`` + 1 s, and when the pipe reaches end-of-file while frozen: the
   kernel closes the pipe when the capturer dies, whatever killed it (SIGKILL too).
   FITHAW of a filesystem that is not frozen fails with EINVAL and changes nothing;
3. the watchdog exits with the capturer (end of file), so none is left behind; if the
   capturer died, it removes the capturer's tracefs instance on its way out.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from journal.errors import X2XError

FIFREEZE = 0xC0045877   # _IOWR('X', 119, int)
FITHAW = 0xC0045878     # _IOWR('X', 120, int)
#: The watchdog thaws this long after the capturer's own cap.
WATCHDOG_MARGIN = 1.0


class FreezeError(X2XError):
    """A filesystem cannot be frozen or thawed."""


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return (path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mount_point_of(rdev: int) -> str | None:
    """The first mount point of the filesystem on device ``rdev`` (st_rdev), or None."""
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want and fields[3] == "/":
                return _unescape(fields[4])
    return None


def _ioctl(fd: int, request: int) -> None:
    fcntl.ioctl(fd, request, 0)


class Freezer:
    """Freezes and thaws one mounted filesystem, with a watchdog child (see above)."""

    def __init__(self, mount_point: str, cap: float, trace_instance: str = "") -> None:
        self.mount_point, self.cap = mount_point, cap
        try:
            self.fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise FreezeError(f"cannot open the mount point {mount_point} to freeze it: "
                              f"{e.strerror}") from None
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent),
                          os.environ.get("PYTHONPATH", "")]))}
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "infra.freeze", mount_point, str(cap + WATCHDOG_MARGIN),
             trace_instance],
            stdin=subprocess.PIPE, start_new_session=True, env=env)
        self.frozen = False

    def _tell(self, what: bytes) -> None:
        assert self.watchdog.stdin is not None
        self.watchdog.stdin.write(what)
        self.watchdog.stdin.flush()

    def freeze(self) -> bool:
        """FIFREEZE (the watchdog is told first, so it covers the whole freeze). False
        when the filesystem was frozen already (by the operator, say): the cut is then
        consistent all the same, and its thaw is not ours to do."""
        if self.watchdog.poll() is not None:
            raise FreezeError(f"the freeze watchdog of {self.mount_point} exited "
                              f"({self.watchdog.returncode}); not freezing without it")
        self._tell(b"F\n")
        try:
            _ioctl(self.fd, FIFREEZE)
        except OSError as e:
            self._tell(b"T\n")
            if e.errno == errno.EBUSY:
                return False
            hint = (" (this filesystem does not support freezing)"
                    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL) else "")
            raise FreezeError(f"cannot freeze {self.mount_point}: {e.strerror}{hint}"
                              ) from None
        self.frozen = True
        return True

    def thaw(self) -> None:
        """FITHAW; a filesystem already thawed (by the watchdog) is not an error."""
        try:
            _ioctl(self.fd, FITHAW)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise FreezeError(f"cannot thaw {self.mount_point}: {e.strerror}") from None
        finally:
            self.frozen = False
            self._tell(b"T\n")

    def close(self) -> None:
        if self.frozen:
            self.thaw()
        if self.watchdog.stdin is not None:
            self.watchdog.stdin.close()
        try:
            self.watchdog.wait(5)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            self.watchdog.wait(5)
        os.close(self.fd)


def watchdog(mount_point: str, cap: float, trace_instance: str = "") -> int:
    """The watchdog child's loop (see the module's docstring). When the capturer dies it
    also removes ``trace_instance`` (its tracefs instance would trace on otherwise)."""
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    frozen_at: float | None = None

    def thaw(why: str) -> None:
        try:
            _ioctl(fd, FITHAW)
            print(f"x2x freeze watchdog: thawed {mount_point} ({why})", file=sys.stderr)
        except OSError:
            pass            # not frozen: nothing to do
    stdin = sys.stdin.buffer.raw
    pending = b""
    while True:
        wait = None if frozen_at is None else max(0.0, frozen_at + cap - time.monotonic())
        ready, _, _ = select.select([stdin], [], [], wait)
        if not ready:
            thaw(f"frozen for more than {cap:g} s")
            frozen_at = None
            continue
        data = os.read(stdin.fileno(), 4096)
        if not data:
            if frozen_at is not None:
                thaw("the capturer died while it was frozen")
            if trace_instance:
                _remove_instance(Path(trace_instance))
            return 0
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line == b"F":
                frozen_at = time.monotonic()
            elif line == b"T":
                frozen_at = None


def _remove_instance(d: Path) -> None:
    """Stop and remove a tracefs instance left by a capturer (gone already after a clean
    stop: then nothing happens)."""
    if not d.is_dir():
        return
    for _ in range(50):                 # the dead capturer's trace_pipe is being closed
        try:
            (d / "tracing_on").write_text("0")
            d.rmdir()
            return
        except OSError:
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(watchdog(sys.argv[1], float(sys.argv[2]), *sys.argv[3:4]))
