"""One owner of a capturer's health: the journaling backend and recovery report through
it, a failure is never forgotten by a resend that ends after it, and a request whose
publisher a new epoch replaced mid-call does not degrade the new epoch."""
from __future__ import annotations

import errno

import pytest

from infra.volume import Volume
from journal.errors import BrokerError
from journal.ops import Op
from producers.health import Condition, Health
from producers.journaling import JournalingVolume, Mode

BS = 4096


def test_degraded_keeps_its_first_reason_until_a_new_epoch_resends():
    h = Health("p")
    assert h.condition is Condition.CAPTURING and h.reason is None
    assert h.degraded_for() is None
    assert h.fail("broker gone")
    assert not h.fail("a consequence")
    assert h.condition is Condition.DEGRADED and h.reason == "broker gone"
    assert h.degraded_for() is not None
    h.resent()                                  # only a resend in progress may end
    assert h.condition is Condition.DEGRADED
    h.resending()
    assert h.condition is Condition.RESENDING and h.reason is None
    h.resent()
    assert h.condition is Condition.CAPTURING


def test_a_failure_during_a_resend_wins_over_its_end():
    h = Health("p")
    h.resending()
    h.fail("broker gone again")
    h.resent()
    assert h.condition is Condition.DEGRADED and h.reason == "broker gone again"


class Pub:
    """Stands in for a publisher; ``on_append`` runs instead of appending."""

    def __init__(self, on_append=None) -> None:
        self.ops: list[Op] = []
        self.on_append = on_append
        self.appended_seq = 0

    def append_many(self, ops: list[Op], client: bool = False) -> None:
        if self.on_append is not None:
            self.on_append()
        self.ops += ops
        self.appended_seq += len(ops)

    def can_defer(self, length: int) -> bool:
        return False

    def close_entry(self) -> None:
        pass

    def wait_journaled(self, seq: int, timeout: float) -> None:
        pass


def backend(tmp_path, pub: Pub, mode: Mode) -> JournalingVolume:
    path = tmp_path / "src.img"
    path.write_bytes(bytes(4 * BS))
    vol = Volume(str(path), writable=True)
    return JournalingVolume(vol, pub, mode, BS, health=Health("p"))  # type: ignore[arg-type]


def _fail() -> None:
    raise BrokerError("no acknowledgement")


def test_a_failing_journal_degrades_and_sync_writes_get_eio(tmp_path):
    b = backend(tmp_path, Pub(_fail), Mode.SYNC)
    with pytest.raises(OSError) as e:
        b.pwrite(0, memoryview(b"x" * BS), False)
    assert e.value.errno == errno.EIO
    assert b.health.condition is Condition.DEGRADED
    assert b.health.reason == "no acknowledgement"


def test_async_write_degrades_but_succeeds(tmp_path):
    b = backend(tmp_path, Pub(_fail), Mode.ASYNC)
    b.pwrite(0, memoryview(b"x" * BS), False)
    assert b.vol.pread(0, BS) == b"x" * BS
    assert b.health.condition is Condition.DEGRADED


def test_a_publisher_replaced_mid_request_does_not_degrade_the_new_epoch(tmp_path):
    new = Pub()
    holder: list[JournalingVolume] = []

    def swap_then_fail() -> None:
        holder[0].use(new)                  # the capturer begins a new epoch meanwhile
        _fail()

    b = backend(tmp_path, Pub(swap_then_fail), Mode.ASYNC)
    holder.append(b)
    b.pwrite(0, memoryview(b"x" * BS), False)
    assert b.health.condition is Condition.CAPTURING
    b.pwrite(BS, memoryview(b"y" * BS), False)
    assert [op.offset for op in new.ops] == [BS]    # the next request uses the new one
