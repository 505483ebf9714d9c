"""The one region loop behind baseline and resends: every byte of the spans is journaled
exactly once, one lock region at a time, as WRITE (data), ZERO (zero blocks) or FILL
(blocks of one other repeated byte)."""
from __future__ import annotations

import threading

from infra.volume import Volume
from journal.ops import Op, OpKind
from producers.journaling import RangeLocks
from producers.regions import journal_regions

BS = 4096
REGION = 4 * BS


class Appended:
    """Stands in for the publisher: keeps the ops, copying data as a Kafka write would."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def append_many(self, ops: list[Op]) -> None:
        self.ops += [Op.write(o.offset, bytes(o.data)) if o.kind is OpKind.WRITE else o
                     for o in ops]


def test_spans_are_journaled_piece_by_piece_within_lock_regions(tmp_path):
    path = tmp_path / "src.img"
    data = bytearray(10 * BS)
    data[BS:2 * BS] = b"ab" * (BS // 2)         # a WRITE in region 0
    data[5 * BS:7 * BS] = b"b" * (2 * BS)       # a FILL in region 1
    path.write_bytes(bytes(data))
    pub, pieces = Appended(), []
    with Volume(str(path)) as vol:
        done = journal_regions(vol, pub, RangeLocks(REGION, 4), BS,  # type: ignore[arg-type]
                               [(0, 3 * BS), (3 * BS, 7 * BS)],
                               lambda base, view, written: pieces.append(
                                   (base, len(view), written)))
    assert done
    # Pieces never cross a region: the second span is cut at 4 and 8 blocks.
    assert pieces == [(0, 3 * BS, [BS]), (3 * BS, BS, []), (4 * BS, 4 * BS, [BS, 2 * BS]),
                      (8 * BS, 2 * BS, [])]
    rebuilt = bytearray(10 * BS)
    for op in pub.ops:
        if op.kind is OpKind.WRITE:
            rebuilt[op.offset:op.offset + op.length] = op.data
        elif op.kind is OpKind.FILL:
            rebuilt[op.offset:op.offset + op.length] = op.data * op.length
    assert rebuilt == data
    assert [op.kind for op in pub.ops if op.kind is not OpKind.ZERO] == [
        OpKind.WRITE, OpKind.FILL]
    assert sum(op.length for op in pub.ops) == 10 * BS


def test_a_stop_ends_it_before_the_next_piece(tmp_path):
    path = tmp_path / "src.img"
    path.write_bytes(bytes(8 * BS))
    stop = threading.Event()
    pub = Appended()

    def after(base: int, view: memoryview, written: list[int]) -> None:
        stop.set()

    with Volume(str(path)) as vol:
        done = journal_regions(vol, pub, RangeLocks(REGION, 4), BS,  # type: ignore[arg-type]
                               [(0, 8 * BS)], after, stop)
    assert not done and sum(op.length for op in pub.ops) == REGION
