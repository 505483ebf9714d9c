"""A volume served over NBD, with the surface of :class:`infra.volume.Volume`.

The applier and the scan capturer do their I/O through it when a pair's source or
target is an image in another format (x2x runs qemu-nbd for it) or an NBD URI. ZERO and
TRIM both become WRITE_ZEROES that may deallocate, so images stay thin and a trimmed
range reads back as zeros, as on the source; :meth:`fsync` is an NBD FLUSH, so a
checkpoint still follows a flush the target acknowledged. A lost connection raises
:class:`VolumeLost`; :meth:`reconnect` makes a new one (restarting x2x's qemu-nbd if it
died).
"""
from __future__ import annotations

import logging
from typing import Sequence

from journal.errors import VolumeError, VolumeLost
from infra.images import ImageServer, Location, open_nbd
from infra.volume import write_fill, write_zeros
from nbd import client as nbd
from nbd import proto

log = logging.getLogger("x2x.volume")


class NBDVolume:
    """An open NBD export (``loc.kind`` nbd) or image (``loc.kind`` image)."""

    is_block_device = False
    _warned = False

    def __init__(self, loc: Location, writable: bool = False) -> None:
        self.loc, self.path, self.writable = loc, loc.text, writable
        self.server = ImageServer(loc, writable) if loc.kind == "image" else None
        self.client: nbd.Client | None = None
        self.size = 0
        try:
            self.reconnect()
        except BaseException:
            self.close()        # never leave x2x's qemu-nbd behind
            raise

    def reconnect(self) -> None:
        """(Re)open the connection; raises VolumeLost while the server is unreachable,
        VolumeError when it refuses (no such export, TLS required or failing)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None and not self.server.alive:
            self.server.start()         # x2x's own qemu-nbd died: a new one
        uri = self.server.uri if self.server is not None else self.loc.path
        self.client = open_nbd(uri)     # VolumeLost while unreachable, VolumeError if refused
        self.size = self.client.size
        if self.writable and self.client.can(proto.FLAG_READ_ONLY):
            self.close()
            raise VolumeError(f"{self.path} is exported read-only; it cannot be a target")

    def __enter__(self) -> "NBDVolume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.close()

    def _io(self, fn):
        if self.client is None:
            raise VolumeLost(f"{self.path} is not connected")
        try:
            return fn()
        except (nbd.Disconnected, proto.ProtocolError) as e:
            self.client.close()         # a garbled stream is as good as a lost one
            raise VolumeLost(f"{self.path}: {e}") from None
        except nbd.NBDError as e:
            raise VolumeError(str(e)) from None

    def pread(self, offset: int, length: int) -> bytes:
        return self._io(lambda: self.client.pread(offset, length))

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._io(lambda: self.client.readinto(offset, buf))

    def stream_into(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        """A pass over the export: this side caches nothing to drop, and reports no
        holes (infra/volume.py): every block is looked at."""
        self.readinto(offset, buf)
        return []

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        self._io(lambda: self.client.pwrite(offset, data))

    def pwritev(self, offset: int, parts: Sequence[bytes | memoryview]) -> None:
        """Write ``parts`` back to back from ``offset``: one NBD write each."""
        for part in parts:
            self.pwrite(offset, part)
            offset += len(part)

    def zero(self, offset: int, length: int) -> None:
        """Read back as zeros, deallocating where the server can."""
        if length <= 0:
            return
        if self.client is not None and self.client.can(proto.FLAG_SEND_WRITE_ZEROES):
            self._io(lambda: self.client.write_zeroes(offset, length))
            return
        write_zeros(self, offset, length)   # type: ignore[arg-type]

    def fill(self, offset: int, length: int, value: int) -> None:
        """Write ``length`` bytes of ``value`` at ``offset`` (a FILL op)."""
        write_fill(self, offset, length, value)   # type: ignore[arg-type]

    def fsync(self) -> None:
        """NBD FLUSH; returns only once the server acknowledged it."""
        if self.client is not None and not self.client.can(proto.FLAG_SEND_FLUSH):
            if not self._warned:
                log.warning("%s does not take FLUSH: its server must write through, or a "
                            "checkpoint may claim more than it holds", self.path)
                self._warned = True
            return
        self._io(lambda: self.client.flush())
