"""A volume: a raw image file or a block device, addressed by byte offset.

Both the capturer (source side) and the applier (target side) do their disk I/O
through this one class, so hole punching, zeroing and size rules live in one place.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from typing import Sequence

from infra.direct import ALIGN, DirectWriter, pwrite_all
from journal.blocks import fill_pattern
from journal.errors import VolumeError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
#: A run of adjacent writes at least this long, page-aligned, is written with O_DIRECT:
#: streaming a replay through the page cache costs the applier far more than the copy
#: into an aligned buffer (measured on a 2-core VM: buffered 1 MiB writes of a fresh
#: file at 60-700 MB/s, the kernel busy allocating and filling page-cache pages that
#: are written back anyway; O_DIRECT at 2.7 GB/s). Small writes stay buffered, where
#: the fsync at the consistency point writes them out together. O_DIRECT is not durability:
#: the device may still cache the write, so a checkpoint still waits for an fsync.
DIRECT_MIN = 256 << 10
#: Bytes per buffered write at most: Linux (6.x, ext4 and block devices) gives a write's
#: page-cache folio the write's own size, up to 2 MiB, and every later small write into
#: a folio walks all of its blocks. Measured on this kernel (6.18, ext4): random 4 KiB
#: writes cost 21.7 us each into a file written in 1 MiB writes, 9.0 after 256 KiB
#: writes, 4.8 after 64 KiB ones; and the 1 MiB writes' copy itself took 0.74-1.7 s for
#: 1 GiB against 0.23 s in 64 KiB pieces. A capture's source is written sequentially
#: (a copy, a restore) and then randomly (the application), so its writes go down in
#: pieces of this size.
WRITE_PIECE = 64 << 10
#: Buffers per pwritev; Linux takes at most 1024.
_IOV_MAX = 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def volume_size(path: str) -> int:
    """Size in bytes of an image file or block device; raises VolumeError if missing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise VolumeError(f"volume {path} does not exist; create it or check the path") from None
    except OSError as e:
        raise VolumeError(f"cannot open volume {path}: {e.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@dataclass
class Volume:
    """An open volume with positional I/O; ``writable`` opens it read-write. ``direct``
    opens it O_DIRECT (reads bypass the page cache: a block device under a mounted
    filesystem is read as its disk holds it; buffers must then be page-aligned, e.g.
    from ``mmap``)."""

    path: str
    writable: bool = False
    direct: bool = False
    fd: int = field(init=False, default=-1)
    size: int = field(init=False, default=0)
    is_block_device: bool = field(init=False, default=False)
    _punch_ok: bool = field(init=False, default=True)
    _seek_ok: bool = field(init=False, default=True)
    _offloads_zero: bool = field(init=False, default=False)
    #: Whether reads may ask not to wait for the disk (RWF_NOWAIT; O_DIRECT never may).
    _nowait_ok: bool = field(init=False, default=True)
    #: The O_DIRECT twin of ``fd`` for long runs (opened on first use).
    _direct: DirectWriter | None = field(init=False, default=None)
    #: False once the file system refused O_DIRECT: long runs are then written buffered.
    _direct_ok: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | (os.O_DIRECT if self.direct
                                                                 else 0)
        try:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VolumeError(
                f"volume {self.path} does not exist; create it (e.g. truncate -s SIZE {self.path})"
                " or check the path"
            ) from None
        except OSError as e:
            raise VolumeError(f"cannot open volume {self.path}: {e.strerror}") from None
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self.fd)
            raise VolumeError(f"{self.path} is neither a regular file nor a block device")
        self.is_block_device = stat.S_ISBLK(mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        if self.is_block_device:
            self._offloads_zero = _device_offloads_zero(os.fstat(self.fd).st_rdev)

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset`` (a short read is an error)."""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise VolumeError(f"short read from {self.path} at offset {offset}: "
                              f"{len(data)} of {length} bytes")
        return data

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        """:meth:`pread` when the page cache holds every byte of it; None when reading
        would wait for the disk (then nothing was read), or the kernel cannot tell."""
        if self.direct or not self._nowait_ok:
            return None
        buf = bytearray(length)
        try:
            n = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait_ok = False     # this file or device never can: ask no more
            return None
        return buf if n == length else None

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``, without allocating."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                raise VolumeError(f"short read from {self.path} at offset {offset + done}")
            done += n

    def stream_into(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        """:meth:`readinto` for a pass over the volume (a baseline, a scan, a digest):
        holes are not read, only zeroed in ``buf`` (reading 700 MiB of holes took 1.4 s),
        and what was read leaves the page cache again. Kept, a whole volume's pass would
        evict the host's working set, and on Linux 6.x (large folios) a client's 4 KiB
        write into a range a read cached costs 7 to 40 times more (20 to 110 us, not 3)
        than into one not cached: an NBD capture after its baseline served random writes
        at a quarter of qemu-nbd's rate for it. A caller that must not see a write race
        the pass holds the range's lock, as for any read.

        Returns the holes zeroed, as ``(offset in buf, length)`` runs in order, so a
        pass need not look for zeros where the file holds none
        (journal.blocks.block_spans)."""
        pos = 0
        holes: list[tuple[int, int]] = []
        for n, hole in self.extents(offset, len(buf), len(buf) // ALIGN + 2):
            if hole:
                _zero_fill(buf[pos:pos + n])
                holes.append((pos, n))
            else:
                self.readinto(offset + pos, buf[pos:pos + n])
            pos += n
        if pos < len(buf):                      # past the runs' limit: read as data
            self.readinto(offset + pos, buf[pos:])
        if not self.direct:
            # Dirty pages (a client's write since) are not dropped, only clean ones.
            os.posix_fadvise(self.fd, offset, len(buf), os.POSIX_FADV_DONTNEED)
        return holes

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` at ``offset``, through the page cache in pieces of
        :data:`WRITE_PIECE`."""
        view = memoryview(data)
        if len(view) <= WRITE_PIECE or self.direct:    # no slicing where it buys nothing
            pwrite_all(self.fd, view, offset)
            return
        for start in range(0, len(view), WRITE_PIECE):
            pwrite_all(self.fd, view[start:start + WRITE_PIECE], offset + start)

    def pwritev(self, offset: int, parts: Sequence[bytes | memoryview]) -> None:
        """Write ``parts`` back to back from ``offset`` (a run of adjacent ops): a long
        page-aligned run bypasses the page cache (:data:`DIRECT_MIN`), any other goes
        down in as few system calls as Linux takes."""
        total = sum(len(p) for p in parts)
        if (self.writable and total >= DIRECT_MIN and offset % ALIGN == 0
                and total % ALIGN == 0 and self._write_direct(offset, parts)):
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            n = os.pwritev(self.fd, views[:_IOV_MAX], offset)
            offset += n
            while views and n >= len(views[0]):      # drop what was written, whole
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]             # a short write ends mid-buffer

    def _write_direct(self, offset: int, parts: Sequence[bytes | memoryview]) -> bool:
        """Write ``parts`` with O_DIRECT (:class:`DirectWriter`); False (nothing written)
        where the file system refuses O_DIRECT, which is then not tried again."""
        if self._direct is None:
            if not self._direct_ok:
                return False
            try:
                self._direct = DirectWriter(self.fd)
            except OSError:         # EINVAL: tmpfs and others take no O_DIRECT
                self._direct_ok = False
                return False
        try:
            self._direct.write(offset, parts)
        except OSError as e:
            # EINVAL: the alignment refused. Buffered from now on, and this run again
            # whole (what reached the disk already is the same bytes at the same offsets).
            if e.errno != errno.EINVAL:
                raise
            self._direct_ok = False
            self._close_direct()
            return False
        return True

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros, deallocating where possible."""
        if length <= 0:
            return
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, _BLKZEROOUT, (ctypes.c_uint64 * 2)(offset, length))
                return
            except OSError:
                pass
        elif self._punch_ok:
            rc = _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                 offset, length)
            if rc == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise VolumeError(f"cannot punch a hole in {self.path}: "
                                  f"{os.strerror(ctypes.get_errno())}")
            self._punch_ok = False
        self._write_zeros(offset, length)

    def zero_is_fast(self) -> bool:
        """Would :meth:`zero` be fast? Fast means it changes metadata instead of writing
        zeros: punching a hole in a regular file (while its filesystem has not refused
        one), or BLKZEROOUT on a device that offloads it (its queue takes write-zeroes
        requests). Otherwise zeroing is as slow as writing, and NBD's FAST_ZERO gets
        ENOTSUP."""
        return self._offloads_zero if self.is_block_device else self._punch_ok

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Allocation of ``[offset, offset + length)`` as consecutive ``(length, hole)``
        runs from ``offset``: at least one (none for an empty range), at most ``limit``
        (then they cover a prefix). A hole holds no blocks and reads as zeros
        (SEEK_HOLE/SEEK_DATA); a block device, or a filesystem without them, is all data.
        Past the end (never asked by the NBD server) is data."""
        if length <= 0:
            return []
        end = min(offset + length, self.size)
        if end <= offset:
            return [(length, False)]
        if self.is_block_device or not self._seek_ok:
            return [(end - offset, False)]
        runs: list[tuple[int, bool]] = []
        pos = offset
        while pos < end and len(runs) < limit:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:      # no SEEK_DATA here: all of it is data
                    self._seek_ok = False
                    return runs + [(end - pos, False)]
                data = end                       # ENXIO: nothing but a hole up to EOF
            if data > pos:
                runs.append((min(data, end) - pos, True))
            else:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)   # EOF counts as a hole
                runs.append((min(max(hole, pos + 1), end) - pos, False))
            pos += runs[-1][0]
        return runs

    def cache(self, offset: int, length: int) -> None:
        """Start reading ``[offset, offset + length)`` into the page cache (a hint)."""
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _write_zeros(self, offset: int, length: int) -> None:
        write_zeros(self, offset, length)

    def fill(self, offset: int, length: int, value: int) -> None:
        """Write ``length`` bytes of ``value`` at ``offset`` (a FILL op)."""
        write_fill(self, offset, length, value)

    def fsync(self) -> None:
        """Make every write so far durable. fdatasync, as qemu-nbd does: the data and
        what reading it back needs (allocation, size), without an mtime-only metadata
        commit on each call (a journal commit of the filesystem holding an image)."""
        os.fdatasync(self.fd)


def _zero_fill(buf: memoryview) -> None:
    """Set ``buf`` to zeros, a MiB at a time from one shared zero buffer."""
    zeros = memoryview(fill_pattern(0))
    for pos in range(0, len(buf), len(zeros)):
        n = min(len(zeros), len(buf) - pos)
        buf[pos:pos + n] = zeros[:n]


def write_zeros(vol: "Volume", offset: int, length: int) -> None:
    """Zero a range by writing zeros, for volumes that cannot deallocate it."""
    write_fill(vol, offset, length, 0)


def write_fill(vol: "Volume", offset: int, length: int, value: int) -> None:
    """Write ``length`` bytes of ``value`` at ``offset``, a MiB at a time."""
    chunk = memoryview(fill_pattern(value))
    end = offset + length
    while offset < end:
        n = min(len(chunk), end - offset)
        vol.pwrite(offset, chunk[:n])
        offset += n


def _device_offloads_zero(rdev: int) -> bool:
    """Does the block device take write-zeroes requests (so BLKZEROOUT writes no data)?
    A partition's queue is its disk's."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{queue}/write_zeroes_max_bytes") as f:
                return int(f.read().strip() or 0) > 0
        except (OSError, ValueError):
            continue
    return False


def digest_of(vol: "Volume", length: int | None = None, chunk: int = 8 << 20) -> bytes:
    """blake3 of the first ``length`` bytes of an open volume (all of it by default)."""
    import blake3
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    end = vol.size if length is None else length
    if end > vol.size:
        raise VolumeError(f"{vol.path} is {vol.size} bytes, shorter than {end}")
    buf = bytearray(chunk)
    for off in range(0, end, chunk):
        view = memoryview(buf)[:min(chunk, end - off)]
        vol.stream_into(off, view)
        h.update(view)
    return h.digest()
