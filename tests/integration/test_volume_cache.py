"""A pass over a volume (a baseline, a scan) reads it through ``Volume.stream_into``,
which reads no holes and leaves nothing of it in the page cache: kept, a whole volume's pass evicts the
host's working set, and a client's write into a range a read cached costs several times
more on Linux 6.x (large folios)."""
from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.volume import Volume
from tests.conftest import cached_bytes, uncached

MiB = 1 << 20


def test_stream_into_leaves_nothing_cached_where_readinto_does(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(os.urandom(8 * MiB))
    buf = memoryview(bytearray(MiB))
    with Volume(str(path)) as vol:
        uncached(path)
        for offset in range(0, vol.size, MiB):
            vol.readinto(offset, buf)
        # The control: a plain read does cache, so the check below can fail.
        assert cached_bytes(path) >= 4 * MiB
        uncached(path)
        expected = path.read_bytes()
        uncached(path)
        for offset in range(0, vol.size, MiB):
            vol.stream_into(offset, buf)
            assert buf == expected[offset:offset + MiB]
        assert cached_bytes(path) == 0


def test_stream_into_keeps_what_a_client_wrote_since(tmp_path: Path) -> None:
    """Dropping clean pages must not lose a dirty one: the bytes read back are the
    client's."""
    path = tmp_path / "v.img"
    path.write_bytes(b"\0" * (2 * MiB))
    with Volume(str(path), writable=True) as vol:
        buf = memoryview(bytearray(MiB))
        vol.pwrite(4096, b"\xa5" * 4096)             # dirty, not yet written back
        vol.stream_into(0, buf)
        assert buf[4096:8192] == b"\xa5" * 4096
        with Volume(str(path)) as other:
            assert other.pread(4096, 4096) == b"\xa5" * 4096


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.integers(0, 63), max_size=64), st.integers(0, 64 * 4096 - 1),
       st.integers(1, 64 * 4096))
def test_stream_into_reads_what_readinto_reads_holes_included(tmp_path: Path, written: set[int],
                                                              offset: int, length: int) -> None:
    """Holes are zeroed, not read: the bytes are the same as a plain read's, for any
    layout of data and holes and any range, a dirty buffer included; the holes it
    reports are in order, inside the range, and zeros."""
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(64 * 4096)
        for block in written:
            f.seek(block * 4096)
            f.write(os.urandom(4096))
    length = min(length, 64 * 4096 - offset)
    with Volume(str(path)) as vol:
        plain, streamed = bytearray(length), bytearray(b"\xee" * length)
        vol.readinto(offset, memoryview(plain))
        holes = vol.stream_into(offset, memoryview(streamed))
        assert streamed == plain
        end = 0
        for start, size in holes:
            assert end <= start and size > 0 and start + size <= length
            assert not any(plain[start:start + size])
            end = start + size
        # Every unwritten whole 4 KiB block of the range is reported as a hole.
        for block in set(range(64)) - written:
            lo, hi = block * 4096 - offset, (block + 1) * 4096 - offset
            if lo >= 0 and hi <= length:
                assert any(s <= lo and hi <= s + n for s, n in holes), (block, holes)


def test_pread_cached_reads_only_what_the_page_cache_holds(tmp_path: Path) -> None:
    """The NBD reader serves a READ itself only when it waits for no disk: ``pread_cached``
    reads what the page cache holds and answers None, reading nothing, for the rest."""
    path = tmp_path / "v.img"
    data = os.urandom(4 * MiB)
    path.write_bytes(data)
    with Volume(str(path)) as vol:
        uncached(path)
        assert vol.pread_cached(MiB, 256 * 1024) is None
        assert cached_bytes(path) < MiB             # asking read nothing in
        assert vol.pread(MiB, 256 * 1024) == data[MiB:MiB + 256 * 1024]
        assert vol.pread_cached(MiB, 256 * 1024) == data[MiB:MiB + 256 * 1024]
        # Half cached is not cached: all of it or nothing.
        assert vol.pread_cached(MiB + 128 * 1024, 256 * 1024) in (
            None, data[MiB + 128 * 1024:MiB + 384 * 1024])
        uncached(path)
        assert vol.pread_cached(MiB, 4096) is None
    with Volume(str(path), direct=True) as vol:     # O_DIRECT never reads the cache
        assert vol.pread_cached(0, 4096) is None
