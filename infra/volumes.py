"""Volumes wherever they live: a raw file or block device (infra/volume.py), an image in
another format or an NBD export (infra/images.py, infra/nbd_volume.py); opening one,
its digest and sparse copies onto one."""
from __future__ import annotations

from infra.images import locate
from infra.nbd_volume import NBDVolume
from infra.volume import Volume, digest_of
from journal.errors import VolumeError


def open_volume(text: str, writable: bool = False) -> "Volume":
    """Open a pair's source or target wherever it lives (infra/images.py): a raw file or
    block device directly, an image in another format or an NBD export over NBD."""
    loc = locate(text)
    if loc.kind == "local":
        return Volume(loc.path, writable)
    return NBDVolume(loc, writable)  # type: ignore[return-value]


def volume_digest(path: str, length: int | None = None, chunk: int = 8 << 20) -> bytes:
    """blake3 of the first ``length`` bytes of a volume (all of it by default), wherever
    it lives (:func:`open_volume`)."""
    with open_volume(path) as vol:
        return digest_of(vol, length, chunk)


def _data_extents(vol: Volume, length: int) -> list[tuple[int, int]]:
    """The ranges of ``[0, length)`` that hold data (:meth:`Volume.extents`); all of it
    where the file system or device does not tell."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < length:
        for n, hole in vol.extents(pos, length - pos, 1024):
            if not hole:
                if out and out[-1][1] == pos:
                    out[-1] = (out[-1][0], pos + n)
                else:
                    out.append((pos, pos + n))
            pos += n
    return out


def copy_sparse(src: str, dst: str, length: int, chunk: int = 8 << 20) -> int:
    """Make the first ``length`` bytes of ``dst`` equal those of ``src``, reading only
    the data extents of ``src`` and leaving holes (or zeros, on a device) for the rest and
    for zero chunks; fsynced; ``dst`` wherever it lives (:func:`open_volume`). Returns
    the bytes written."""
    written = 0
    with Volume(src) as s, open_volume(dst, writable=True) as d:
        if s.size < length or d.size < length:
            raise VolumeError(f"copying {length} bytes from {src} ({s.size}) to {dst} "
                              f"({d.size}): one of them is too small")
        pos = 0
        for start, end in _data_extents(s, length):
            d.zero(pos, start - pos)
            for off in range(start, end, chunk):
                data = s.pread(off, min(chunk, end - off))
                if data.count(0) == len(data):
                    d.zero(off, len(data))
                else:
                    d.pwrite(off, data)
                    written += len(data)
            pos = end
        d.zero(pos, length - pos)
        d.fsync()
    return written
