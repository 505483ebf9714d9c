"""The trace capturer's resume point on a real directory (producers/trace_resume.py).

After a kill, the loaded map must believe no block that may have been appended after the
last acknowledged cut, and must hold the map of that cut for every other block; waiting
for a cut's acknowledgement must not copy the map (a GiB at 2 TiB, taken while the
filesystem is frozen).
"""
from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

from hypothesis import given, settings, strategies as st

from journal.blocks import HASH_LEN
from producers.trace_resume import ResumePoint

BLOCK = 4096
UNKNOWN = b"\xff" * HASH_LEN

# A run of the capture loop: a block appended with a new hash, a cut (its FLUSH), the
# broker acknowledging everything journaled so far.
step = st.one_of(st.tuples(st.just("append"), st.integers(0, 15), st.integers(0, 255)),
                 st.tuples(st.just("cut")), st.tuples(st.just("ack")))


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.lists(step, max_size=60))
def test_after_a_kill_the_map_is_the_last_acknowledged_cut_less_what_came_after(
        resumed: bool, steps: list[tuple]) -> None:
    """``resumed``: the run started from a saved map (else from a baseline, no map)."""
    blocks = 16
    with tempfile.TemporaryDirectory() as d:
        rp = ResumePoint(Path(d), BLOCK, blocks * BLOCK)
        live = bytearray(blocks * HASH_LEN)
        if resumed:
            rp.save(live)                   # the map the run started from
        saved: bytes | None = bytes(live) if resumed else None  # model: the last acked map
        after_saved: set[int] = set()       # model: blocks appended after that cut
        seq = 0                             # sequence numbers of appended FLUSHes
        waiting: tuple[int, bytes, set[int]] | None = None      # model: the pending cut
        for s in steps:
            if s[0] == "append":
                i = s[1]
                live[i * HASH_LEN:(i + 1) * HASH_LEN] = bytes([s[2]]) * HASH_LEN
                rp.touch(i)
                after_saved.add(i)
                if waiting is not None:
                    waiting[2].add(i)
            elif s[0] == "cut":
                seq += 1
                rp.snapshot(seq)
                if waiting is None:
                    waiting = (seq, bytes(live), set())
            elif rp.commit_if_acked(seq, live):
                assert waiting is not None and waiting[0] <= seq
                _, saved, after_saved = waiting
                waiting = None
            else:
                assert waiting is None
        rp.close()                          # killed: nothing else is written
        again = ResumePoint(Path(d), BLOCK, blocks * BLOCK)
        loaded = again.load()
        again.close()
    if saved is None:
        assert loaded is None, "a map loaded where none was ever saved"
        return
    assert loaded is not None
    for i in range(blocks):
        got = loaded[i * HASH_LEN:(i + 1) * HASH_LEN]
        want = UNKNOWN if i in after_saved else saved[i * HASH_LEN:(i + 1) * HASH_LEN]
        assert got == want, f"block {i}: {bytes(got[:2]).hex()} != {want[:2].hex()}"


def test_waiting_for_a_cut_to_be_acknowledged_copies_no_map(tmp_path: Path) -> None:
    """A 64 GiB volume in 64 KiB blocks: a 32 MiB map, and a snapshot that costs nothing
    (the old one was a copy of the whole map, made while the filesystem was frozen)."""
    block, size = 64 << 10, 64 << 30
    rp = ResumePoint(tmp_path, block, size)
    live = bytearray(size // block * HASH_LEN)
    tracemalloc.start()
    try:
        rp.snapshot(7)
        for i in range(0, size // block, 997):
            live[i * HASH_LEN] = 1
            rp.touch(i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(live) // 8, f"{peak} bytes allocated while a 32 MiB map waits"
    assert rp.commit_if_acked(7, live)
    assert Path(tmp_path / "trace.map").read_bytes() == live
    rp.close()


def _written_so_far() -> int:
    """Bytes this process has written through write syscalls (/proc/self/io ``wchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no wchar")


def test_a_commit_writes_the_touched_entries_in_place_not_the_whole_map(
        tmp_path: Path) -> None:
    """Saved whole once, the map is then written only where blocks were appended (the
    whole map is 32 MiB at 64 GiB, a GiB at 2 TiB, every SNAPSHOT_EVERY seconds)."""
    block, size = 64 << 10, 64 << 30
    rp = ResumePoint(tmp_path, block, size)
    live = bytearray(size // block * HASH_LEN)
    rp.save(live)
    touched = range(5, size // block, 4099)
    for i in touched:
        live[i * HASH_LEN:(i + 1) * HASH_LEN] = b"\x05" * HASH_LEN
        rp.touch(i)
    rp.snapshot(3)
    rp.touch(10)                            # appended after the FLUSH
    live[10 * HASH_LEN:11 * HASH_LEN] = b"\x06" * HASH_LEN
    before = _written_so_far()
    assert rp.commit_if_acked(3, live)
    wrote = _written_so_far() - before
    assert wrote < len(touched) * 4096 + 8192, f"{wrote} bytes written for {len(touched)} blocks"
    assert Path(tmp_path / "trace.map").read_bytes() == live
    # Blocks appended after the FLUSH keep their bits; every other bit is cleared.
    assert rp.bits[10] == 1 and rp.bits[5] == 0 and rp.bits[:].count(1) == 1
    rp.close()


@given(st.lists(st.booleans(), max_size=300), st.integers(1, 40))
def test_runs_cover_every_set_bit_and_join_only_close_ones(bits: list[bool], gap: int) -> None:
    from producers.trace_resume import _runs
    raw = bytes(bits)
    runs = list(_runs(raw, gap))
    covered = set()
    for n, (first, end) in enumerate(runs):
        assert raw[first] == 1 and raw[end - 1] == 1
        if n:
            assert first - runs[n - 1][1] >= gap     # farther apart: not joined
        covered.update(range(first, end))
    assert {i for i, b in enumerate(bits) if b} <= covered


def test_a_commit_after_the_files_were_forgotten_saves_the_map_whole(tmp_path: Path) -> None:
    from producers.trace_resume import forget
    rp = ResumePoint(tmp_path, BLOCK, 64 * BLOCK)
    live = bytearray(b"\x02" * 64 * HASH_LEN)
    rp.save(live)
    forget(tmp_path)                        # e.g. a failback, while the resume point lives
    live[3 * HASH_LEN] = 9
    rp.touch(3)
    rp.snapshot(1)
    assert rp.commit_if_acked(1, live)
    assert (tmp_path / "trace.map").read_bytes() == live
    rp.close()
