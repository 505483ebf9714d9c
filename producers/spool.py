"""The capturer's local spool: journal records encoded but not yet handed to Kafka.

In async mode a client's write is acknowledged once it is on the source and "the journal
follows". When the broker takes records slower than clients write, the publisher's
in-flight window fills; rather than stall every client at the broker's pace, further
records queue here, on local disk, in order, and are shipped as the window frees up (the
disk queue of Double-Take and its kind). Memory stays bounded by the window.

The spool is a FIFO of length-prefixed records in segment files under the pair's state
dir, unlinked as soon as they are created: nothing of it outlives the process, and it
needs none. A crash loses what it held, but every block of it is still marked in the
write-intent bitmap (bits clear only once a FLUSH after them is acknowledged), so the
restart resends those blocks. Not thread-safe: the publisher calls it under its lock.
"""
from __future__ import annotations

import os
import struct
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from journal.errors import BadInput
from journal.pairs import parse_size

_LEN = struct.Struct("<I")
#: Buffers per pwritev; Linux takes at most 1024 (the length prefix is one of them).
_IOV_MAX = 1000
#: Segment files roll over at this size, so a drained segment gives its space back
#: while a busy spool keeps growing at its tail.
SEGMENT = 64 << 20
#: Default cap on spooled bytes; beyond it writers wait for the broker again.
DEFAULT_MAX = 2 << 30


def max_from_env() -> int:
    """``X2X_SPOOL_MAX`` (default 2 GiB; 0 turns the spool off)."""
    raw = os.environ.get("X2X_SPOOL_MAX")
    try:
        return DEFAULT_MAX if raw is None else parse_size(raw)
    except BadInput as e:
        raise BadInput(f"X2X_SPOOL_MAX: {e}") from None


@dataclass
class _Segment:
    fd: int
    write_at: int = 0
    read_at: int = 0


class Spool:
    """FIFO of byte records on local disk, at most ``max_bytes`` of payload."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX,
                 segment: int = SEGMENT) -> None:
        self.directory, self.max_bytes, self.segment = directory, max_bytes, segment
        self.bytes = 0          # payload bytes queued
        self.records = 0
        self.peak = 0           # most payload bytes ever queued at once (for reports)
        self._segments: deque[_Segment] = deque()

    def fits(self, n: int) -> bool:
        return self.bytes + n <= self.max_bytes

    def push(self, parts: list[bytes | memoryview]) -> None:
        """Queue one record given as the buffers it is made of (no copy is made)."""
        if not self._segments or self._segments[-1].write_at >= self.segment:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="spool-", dir=self.directory)
            os.unlink(name)
            self._segments.append(_Segment(fd))
        seg = self._segments[-1]
        n = sum(len(p) for p in parts)
        if len(parts) > _IOV_MAX:
            parts = [b"".join(parts)]
        if os.pwritev(seg.fd, [_LEN.pack(n), *parts], seg.write_at) != _LEN.size + n:
            raise OSError(f"short write to the spool in {self.directory}: is the disk full?")
        seg.write_at += _LEN.size + n
        self.bytes += n
        self.records += 1
        self.peak = max(self.peak, self.bytes)

    def pop(self) -> bytes | None:
        """The oldest record, or None when empty."""
        if not self.records:
            return None
        seg = self._segments[0]
        (n,) = _LEN.unpack(os.pread(seg.fd, _LEN.size, seg.read_at))
        value = os.pread(seg.fd, n, seg.read_at + _LEN.size)
        if len(value) != n:
            raise OSError(f"a spool segment in {self.directory} was truncated")
        seg.read_at += _LEN.size + n
        self.bytes -= n
        self.records -= 1
        if seg.read_at == seg.write_at:
            if len(self._segments) == 1:
                # Drained: give the space back and write from the start again.
                os.ftruncate(seg.fd, 0)
                seg.write_at = seg.read_at = 0
            else:
                os.close(self._segments.popleft().fd)
        return value

    def clear(self) -> None:
        while self._segments:
            os.close(self._segments.popleft().fd)
        self.bytes = self.records = 0

    def __len__(self) -> int:
        return self.records
