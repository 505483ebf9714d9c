"""The target writer (consumers/writer.py, infra/volume.Volume.pwritev, infra/direct.py):
adjacent WRITEs of a batch go down as one run, long aligned runs bypass the page cache
through two aligned buffers, and the target ends exactly as applying the ops one by one
would leave it (DESIGN rule 4: ops are absolute, so order is all that matters)."""
from __future__ import annotations

import ctypes
import errno
import os
import random
import resource
import signal

import pytest

from consumers.writer import apply_entries, apply_op
from infra import volume as volume_mod
from infra.direct import PIECE, copy_out
from infra.volume import Volume
from journal.ops import Entry, Op

KiB, MiB = 1 << 10, 1 << 20


def _entries(ops: list[Op], per_entry: int = 3) -> list[Entry]:
    out, seq = [], 1
    for i in range(0, len(ops), per_entry):
        chunk = tuple(ops[i:i + per_entry])
        out.append(Entry("p", 1, seq, 0, 0, chunk))
        seq += len(chunk)
    return out


def _workload(rng: random.Random, size: int) -> list[Op]:
    """A stream of adjacent writes (a baseline) broken by overwrites, zeros and trims
    of the same bytes, in sizes aligned and not."""
    ops: list[Op] = []
    pos = 0
    while pos < size // 2:
        n = rng.choice([4 * KiB, 64 * KiB, 960 * KiB - 32, 300 * KiB])
        n = min(n, size // 2 - pos)
        ops.append(Op.write(pos, rng.randbytes(n)))
        pos += n
    for _ in range(200):
        off = rng.randrange(0, size - 2 * MiB)
        kind = rng.random()
        if kind < 0.6:
            n = rng.choice([512, 4 * KiB, 256 * KiB, 1 * MiB + 4 * KiB])
            ops.append(Op.write(off - off % 512, memoryview(rng.randbytes(n))))
            if rng.random() < 0.5:        # and the run continues right after it
                ops.append(Op.write(ops[-1].offset + n, rng.randbytes(64 * KiB)))
        elif kind < 0.8:
            ops.append(Op.zero(off, rng.randrange(1, 1 * MiB)))
        else:
            ops.append(Op.trim(off, rng.randrange(1, 1 * MiB)))
    return ops


def _one_by_one(path, ops: list[Op]) -> None:
    with Volume(str(path), writable=True) as vol:
        for op in ops:
            apply_op(vol, op)


@pytest.mark.parametrize("seed", [1, 2])
def test_runs_leave_the_target_as_op_by_op_application_does(tmp_path, seed) -> None:
    size = 16 * MiB
    ops = _workload(random.Random(seed), size)
    a, b = tmp_path / "runs.img", tmp_path / "ops.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(size)
    with Volume(str(a), writable=True) as vol:
        apply_entries(vol, _entries(ops))
        direct = vol._direct
    _one_by_one(b, ops)
    assert a.read_bytes() == b.read_bytes()
    assert direct is not None                 # long aligned runs went with O_DIRECT


def test_a_file_system_without_o_direct_is_written_buffered(tmp_path, monkeypatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")     # as tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(volume_mod.os, "open", no_direct)
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    data = os.urandom(2 * MiB)
    with Volume(str(path), writable=True) as vol:
        vol.pwritev(MiB, [data[:MiB], memoryview(data)[MiB:]])
        assert vol._direct is None and not vol._direct_ok
    assert path.read_bytes()[MiB:3 * MiB] == data


def test_a_run_longer_than_the_iovec_limit_is_written_whole(tmp_path) -> None:
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    parts = [os.urandom(100) for _ in range(3000)]     # short, unaligned: buffered
    with Volume(str(path), writable=True) as vol:
        vol.pwritev(7, parts)
    assert path.read_bytes()[7:7 + 300_000] == b"".join(parts)


def test_copy_out_copies_a_read_only_slice() -> None:
    src = bytes(range(256)) * 64
    dst = ctypes.create_string_buffer(1000)
    copy_out(ctypes.addressof(dst), memoryview(src)[100:], 7, 1000)
    assert dst.raw == src[107:1107]


def test_a_long_run_of_odd_parts_is_written_whole_through_both_buffers(tmp_path) -> None:
    # 2.5 pieces in parts cut at random points, so copies straddle the buffers' edges,
    # and each buffer is filled again while the other is on its way to the disk.
    total = 5 * PIECE // 2
    data = os.urandom(total)
    cuts = sorted(random.Random(3).sample(range(1, total), 40))
    parts = [memoryview(data)[a:b] for a, b in zip([0, *cuts], [*cuts, total])]
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.truncate(total + 2 * PIECE)
    with Volume(str(path), writable=True) as vol:
        vol.pwritev(PIECE, parts)
        assert vol._direct is not None            # it went with O_DIRECT
    got = path.read_bytes()
    assert got[PIECE:PIECE + total] == data
    assert got[:PIECE] == got[PIECE + total:] == bytes(PIECE)


def test_a_failed_direct_write_is_raised_and_the_volume_stays_usable(tmp_path) -> None:
    # A file size limit fails the writes past it (EFBIG), as a full disk fails them:
    # the error reaches the caller, nothing is left in flight, the volume still writes.
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.truncate(MiB)
    data = os.urandom(3 * PIECE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with Volume(str(path), writable=True) as vol:
            resource.setrlimit(resource.RLIMIT_FSIZE, (PIECE + PIECE // 2, old_limit[1]))
            try:
                with pytest.raises(OSError) as failed:
                    vol.pwritev(0, [data])
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            assert failed.value.errno == errno.EFBIG
            vol.pwritev(0, [data])              # again, once there is room
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == data
