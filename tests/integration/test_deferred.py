"""Writes journaled from the source (producers/deferred.py), on a real image file and no
broker: whatever the interleaving of client changes and journal reads, every deferred op
carries exactly the bytes its own write made (journal/DESIGN.md rule 11), and replaying
the ops in order rebuilds the source."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from infra.volume import Volume
from journal.errors import BadInput
from producers.deferred import DeferredWrites, SourceBytes, hold_from_env

SIZE = 1 << 20
PIECE = 48 << 10           # what one op carries, small so that writes are cut in pieces

change = st.tuples(st.integers(0, SIZE // 512 - 1), st.integers(1, 256), st.integers(1, 255))
steps = st.lists(st.one_of(change.map(lambda c: ("write", *c)),
                           st.integers(0, 5).map(lambda n: ("journal", n))),
                 min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(steps=steps)
def test_a_deferred_write_overtaken_before_it_is_journaled_keeps_its_own_bytes(
        tmp_path_factory, steps) -> None:
    path = tmp_path_factory.mktemp("deferred") / "src.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    early: list[int] = []
    with Volume(str(path), writable=True) as vol:
        index = DeferredWrites(vol, grain=64 << 10)
        pending: list[tuple[SourceBytes, bytes]] = []      # in journal order
        made: list[SourceBytes] = []
        journal: list[tuple[int, bytes]] = []
        for step in steps:
            if step[0] == "write":
                _, sector, sectors, fill = step
                offset = sector * 512
                data = bytes([fill]) * min(sectors * 512, SIZE - offset)
                # What the journaling volume does under the range lock:
                index.read_overlapping(offset, len(data))
                vol.pwrite(offset, data)
                for s in index.defer(offset, len(data), PIECE, early.append):
                    made.append(s)
                    pending.append((s, data[s.offset - offset:s.offset - offset + s.length]))
            else:
                for s, wrote in pending[:step[1]]:
                    journal.append((s.offset, _taken(s, wrote)))
                del pending[:step[1]]
        for s, wrote in pending:
            journal.append((s.offset, _taken(s, wrote)))
        assert len(index) == 0                      # every promise kept, none left filed
        source = vol.pread(0, SIZE)
    replay = bytearray(SIZE)
    for offset, data in journal:
        replay[offset:offset + len(data)] = data
    assert bytes(replay) == source
    # Each op read before its turn was reported once, with its size.
    assert sorted(early) == sorted(s.length for s in made if s.early)


def _taken(s: SourceBytes, wrote: bytes) -> bytes:
    data = s.take()
    assert data == wrote, f"op at {s.offset} carries other bytes than its write made"
    assert s.take() is data                         # read once, then held
    return data


def test_bytes_read_early_are_reported_once(tmp_path: Path) -> None:
    path = tmp_path / "src.img"
    path.write_bytes(b"\0" * SIZE)
    early: list[int] = []
    with Volume(str(path), writable=True) as vol:
        index = DeferredWrites(vol)
        vol.pwrite(0, b"\x11" * 100_000)
        a, b, c = index.defer(0, 100_000, 40_000, early.append)
        index.read_overlapping(50_000, 10)          # overtakes b only
        index.read_overlapping(50_000, 10)          # already read: nothing more
        assert (a.early, b.early, c.early) == (False, True, False) and early == [40_000]
        vol.pwrite(50_000, b"\x22" * 10)
        assert b.take() == b"\x11" * 40_000 and len(index) == 2
        assert (a.take(), c.take()) == (b"\x11" * 40_000, b"\x11" * 20_000)
        assert len(index) == 0
        index.defer(0, 10, 10, early.append)
        index.clear()
        assert len(index) == 0


@pytest.mark.parametrize("raw", ["soon", "-1", "1e9", "2 minutes"])
def test_bad_async_hold_is_refused_naming_the_variable(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("X2X_ASYNC_HOLD", raw)
    with pytest.raises(BadInput, match=r"X2X_ASYNC_HOLD=.* is invalid: give seconds"):
        hold_from_env()


def test_async_hold_parses_seconds(monkeypatch) -> None:
    monkeypatch.delenv("X2X_ASYNC_HOLD", raising=False)
    assert hold_from_env() == 2.0
    for raw, value in (("0", 0.0), ("0.5", 0.5), ("3s", 3.0)):
        monkeypatch.setenv("X2X_ASYNC_HOLD", raw)
        assert hold_from_env() == value
