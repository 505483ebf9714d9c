"""The NBD reader's read-ahead bound (nbd/server.py _Inflight): before it waits for room,
it runs what the reader runs before any wait (a sync capture ships the writes it served,
whose acknowledgements free that room)."""
from __future__ import annotations

import threading

from nbd.server import _Inflight


def test_room_is_taken_without_the_hook_while_there_is_some() -> None:
    room = _Inflight(2, 1 << 20)
    calls: list[str] = []
    room.acquire(4096, lambda: calls.append("wait"))
    room.acquire(4096, lambda: calls.append("wait"))
    assert (room.requests, room.bytes, calls) == (2, 8192, [])


def test_the_hook_runs_before_waiting_and_the_release_ends_the_wait() -> None:
    room = _Inflight(1, 1 << 20)
    room.acquire(4096, lambda: None)
    hooked = threading.Event()
    got = threading.Event()

    def before_wait() -> None:
        hooked.set()

    def second() -> None:
        room.acquire(100, before_wait)
        got.set()
    t = threading.Thread(target=second)
    t.start()
    assert hooked.wait(10), "no hook before waiting for room"
    assert not got.is_set()
    room.release(4096)
    assert got.wait(10), "the release did not end the wait"
    t.join(10)
    assert (room.requests, room.bytes) == (1, 100)
