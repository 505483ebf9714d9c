"""Block hashing, zero and fill detection and hash-map diffs (blake3 over whole blocks).

A hash map is one ``bytes`` of ``HASH_LEN`` bytes per block, so it is compact, compares
with one ``==`` per block and is written to disk as it is.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import blake3

HASH_LEN = 32
_zero_blocks: dict[int, bytes] = {}
_zero_hashes: dict[int, bytes] = {}


def zero_block(size: int) -> bytes:
    """A block of ``size`` zero bytes (cached: compared against often)."""
    blk = _zero_blocks.get(size)
    if blk is None:
        blk = _zero_blocks[size] = bytes(size)
    return blk


def zero_hash(size: int) -> bytes:
    """The blake3 hash of a zero block of ``size`` bytes."""
    h = _zero_hashes.get(size)
    if h is None:
        h = _zero_hashes[size] = blake3.blake3(zero_block(size)).digest()
    return h


_HEAD = 64


def zero_hashes_over(hashes: bytearray, offset: int, length: int, block_size: int) -> None:
    """Set the map's entries of the blocks of ``length`` bytes at ``offset`` (a block
    boundary; the last block may be short) to the hashes of zero blocks, at once."""
    first = offset // block_size
    whole, tail = divmod(length, block_size)
    hashes[first * HASH_LEN:(first + whole) * HASH_LEN] = zero_hash(block_size) * whole
    if tail:
        hashes[(first + whole) * HASH_LEN:(first + whole + 1) * HASH_LEN] = zero_hash(tail)


def is_zero(block: memoryview) -> bool:
    """True when the block is all zeros."""
    return fill_byte(block) == 0


_CHUNK = 1 << 20


@functools.lru_cache(maxsize=4)
def fill_pattern(value: int) -> bytes:
    """A MiB of the byte ``value`` (cached for the few values volumes are filled with:
    zeros, 0xFF, a test's pattern)."""
    return zero_block(_CHUNK) if value == 0 else bytes((value,)) * _CHUNK


def fill_byte(data: memoryview) -> int | None:
    """The byte every byte of ``data`` is (0 for no bytes), or None when they differ.

    ``memoryview == bytes`` compares element by element in CPython (~0.25 GiB/s); a bytes
    copy compared with ``==`` is a memcpy plus memcmp (~9 GiB/s), so ``data`` is copied
    a MiB at a time and compared with one cached pattern, whatever its length (a block
    or a client's write). Data almost always differs within its first bytes, so those
    are looked at first, without copying the rest."""
    head = bytes(data[:_HEAD])
    if not head:
        return 0
    if head.count(head[:1]) != len(head):
        return None
    pattern = fill_pattern(head[0])
    if len(data) <= _CHUNK:     # a client's write: one copy, one compare, no loop
        return head[0] if pattern.startswith(bytes(data[_HEAD:])) else None
    # startswith compares a chunk with the pattern's prefix without slicing a copy of it.
    if all(pattern.startswith(bytes(data[i:i + _CHUNK]))
           for i in range(_HEAD, len(data), _CHUNK)):
        return head[0]
    return None


def hash_block(block: memoryview) -> bytes:
    """blake3 of one block; zero blocks skip hashing."""
    if is_zero(block):
        return zero_hash(len(block))
    return blake3.blake3(block).digest()


def hash_buffer(buf: memoryview, block_size: int) -> list[bytes]:
    """Hashes of consecutive blocks of ``buf`` (the last one may be short)."""
    return [hash_block(buf[i:i + block_size]) for i in range(0, len(buf), block_size)]


def block_count(volume_size: int, block_size: int) -> int:
    return -(-volume_size // block_size)


def block_spans(length: int, block_size: int,
                holes: list[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
    """Walk a buffer of ``length`` bytes that starts on a block boundary, block by block,
    except where ``holes`` (sorted ``(offset, length)`` runs of it known to read as
    zeros: a file's unallocated ranges) cover whole blocks: those come as one span.
    Yields ``(offset, length, hole)``; the spans cover the buffer in order, a hole span
    is a whole number of blocks, any other span one block (the last may be short).

    A pass over a mostly empty volume then costs per hole, not per block: checking
    every 64 KiB block of 64 GiB of holes for zeros took 60 % of a scan's time."""
    pos = 0
    for start, size in holes:
        first = max(-(-start // block_size) * block_size, pos)
        last = min((start + size) // block_size * block_size, length)
        if last <= first:
            continue
        for off in range(pos, first, block_size):
            yield off, min(block_size, length - off), False
        yield first, last - first, True
        pos = last
    for off in range(pos, length, block_size):
        yield off, min(block_size, length - off), False


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range ``[offset, offset + length)``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(indexes: list[int], block_size: int, volume_size: int,
             max_length: int) -> Iterator[Extent]:
    """Join sorted block indexes into extents no longer than ``max_length`` bytes."""
    start = prev = None
    for i in indexes:
        if start is not None and i == prev + 1 and (i + 1 - start) * block_size <= max_length:
            prev = i
            continue
        if start is not None:
            yield _extent(start, prev, block_size, volume_size)
        start = prev = i
    if start is not None:
        yield _extent(start, prev, block_size, volume_size)


def _extent(first: int, last: int, block_size: int, volume_size: int) -> Extent:
    offset = first * block_size
    return Extent(offset, min((last + 1) * block_size, volume_size) - offset)


def diff_maps(old: bytes, new: bytes) -> list[int]:
    """Indexes of blocks whose hash differs between two hash maps of equal length."""
    if len(old) != len(new):
        raise ValueError("hash maps of different volume sizes cannot be compared")
    if old == new:
        return []
    mo, mn = memoryview(old), memoryview(new)
    return [i for i in range(len(new) // HASH_LEN)
            if mo[i * HASH_LEN:(i + 1) * HASH_LEN] != mn[i * HASH_LEN:(i + 1) * HASH_LEN]]


def format_extents(extents: list[Extent]) -> str:
    """Extents as ``offset+length,...`` (decimal): compact enough for a control event."""
    return ",".join(f"{e.offset}+{e.length}" for e in extents)


def parse_extents(text: str) -> list[Extent]:
    """The inverse of :func:`format_extents`; refuses anything else with ValueError."""
    out = []
    for part in filter(None, text.split(",")):
        off, _, length = part.partition("+")
        out.append(Extent(int(off), int(length)))
    return out
