"""The capturer's saved state and block hash map on a real directory (producers/state.py).

The map is 32 bytes a block (a GiB for 2 TiB in 64 KiB blocks): a start reads it into the
one buffer the capturer keeps, a stop writes that buffer as it is, and what needs only the
state (a failback's direction, a resync) does not read the map at all.
"""
from __future__ import annotations

from pathlib import Path

from journal.blocks import HASH_LEN, block_count
from producers.state import CaptureState, StateStore

BLOCK = 64 << 10


def _read_bytes_so_far() -> int:
    """Bytes this process has read through read syscalls (/proc/self/io ``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar")


def _store(tmp_path: Path, size: int) -> tuple[StateStore, CaptureState, bytearray]:
    store = StateStore("p", directory=tmp_path)
    state = CaptureState(epoch=3, next_seq=41, block_size=BLOCK, volume_size=size)
    hashes = bytearray(block_count(size, BLOCK) * HASH_LEN)
    hashes[::4099] = b"\x07" * len(hashes[::4099])
    return store, state, hashes


def test_the_saved_map_loads_into_a_buffer_the_capturer_can_keep(tmp_path: Path) -> None:
    store, state, hashes = _store(tmp_path, 1 << 30)
    store.save(state, hashes)
    loaded_state, loaded = store.load()
    assert loaded_state == state
    assert loaded == hashes
    # Kept and updated in place by the capturer: a bytearray, not bytes to copy first.
    assert isinstance(loaded, bytearray)
    loaded[0:HASH_LEN] = b"\x01" * HASH_LEN
    assert store.hashes.read_bytes() == bytes(hashes)    # the file is not a view of it


def test_the_state_alone_is_read_without_the_map(tmp_path: Path) -> None:
    # 64 GiB in 64 KiB blocks: a 32 MiB map, which a failback or a resync does not need.
    store, state, hashes = _store(tmp_path, 64 << 30)
    store.save(state, hashes)
    before = _read_bytes_so_far()
    assert store.load_state() == state
    state_read = _read_bytes_so_far() - before
    before = _read_bytes_so_far()
    _, loaded = store.load()
    map_read = _read_bytes_so_far() - before
    assert loaded == hashes
    assert state_read < 64 << 10, f"load_state read {state_read} bytes"
    assert map_read >= len(hashes)


def test_no_saved_map_loads_as_none(tmp_path: Path) -> None:
    store, state, _ = _store(tmp_path, 1 << 20)
    store.save(state)
    assert store.load() == (state, None)
    assert StateStore("q", directory=tmp_path / "none").load() == (None, None)
