"""Volume.extents, the allocation the NBD export reports (base:allocation, sparse READ
replies): on a real sparse file, for any layout and any range, the runs are consecutive,
cover a prefix of the range (all of it within the limit), holes read as zeros and every
written block lies in data. Also what "fast zero" means for a volume."""
from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.volume import WRITE_PIECE, Volume

BLOCK = 4096
BLOCKS = 64


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.integers(0, BLOCKS - 1), max_size=BLOCKS), st.integers(0, BLOCKS * BLOCK),
       st.integers(0, BLOCKS * BLOCK + 8192), st.integers(1, 8))
def test_extents_describe_the_file(tmp_path: Path, written: set[int], offset: int, length: int,
                                   limit: int) -> None:
    path = tmp_path / "v.img"
    with open(path, "wb") as f:
        f.truncate(BLOCKS * BLOCK)
        for b in written:
            f.seek(b * BLOCK)
            f.write(b"\xa5" * BLOCK)
    with Volume(str(path)) as vol:
        runs = vol.extents(offset, length, limit)
        assert bool(runs) == (length > 0)
        assert all(n > 0 for n, _ in runs) and len(runs) <= limit
        covered = sum(n for n, _ in runs)
        end = min(offset + length, vol.size)
        if offset < vol.size:
            assert covered <= end - offset
            if len(runs) < limit:
                assert covered == end - offset
        pos = offset
        for n, hole in runs:
            if pos >= vol.size:
                break
            if hole:
                assert vol.pread(pos, n) == bytes(n)
                assert not any(pos < (b + 1) * BLOCK and b * BLOCK < pos + n for b in written)
            pos += n
        for a, b in zip(runs, runs[1:]):
            assert a[1] != b[1]         # holes and data alternate


def test_zero_is_fast_on_a_file_that_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    with open(path, "wb") as f:
        f.write(b"\x01" * 65536)
    with Volume(str(path), writable=True) as vol:
        assert vol.zero_is_fast()                   # ext4/xfs/tmpfs punch holes
        vol.zero(0, 65536)
        assert vol.extents(0, 65536, 4) == [(65536, True)]
        vol.cache(0, 65536)                         # a hint; never fails


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 3 * WRITE_PIECE), st.integers(1, 3 * WRITE_PIECE + 1))
def test_a_write_lands_whole_whatever_its_pieces(tmp_path: Path, offset: int,
                                                 length: int) -> None:
    """pwrite goes down in pieces of WRITE_PIECE: every byte arrives, in its place, and
    nothing around it changes, for lengths under, at and across the pieces' bounds."""
    path = tmp_path / "w.img"
    size = 8 * WRITE_PIECE
    with open(path, "wb") as f:
        f.write(b"\x11" * size)
    data = bytes(i % 251 for i in range(length))
    with Volume(str(path), writable=True) as vol:
        vol.pwrite(offset, data)
    image = path.read_bytes()
    assert image[offset:offset + length] == data
    assert image[:offset] == b"\x11" * offset
    assert image[offset + length:] == b"\x11" * (size - offset - length)
