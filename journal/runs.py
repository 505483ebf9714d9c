"""Turning a stream of changed blocks into as few ops as possible."""
from __future__ import annotations

from dataclasses import dataclass, field

from journal.batch import DEFAULT_BUDGET, OP_OVERHEAD
from journal.blocks import fill_byte
from journal.ops import Op, OpKind

#: ZERO and FILL runs carry no data, so they may be long; a bound keeps one op's
#: meaning obvious.
MAX_FILL_RUN = 1 << 30


def write_op(offset: int, data: memoryview) -> Op:
    """The op that journals a write of ``data``: ZERO or FILL when it is one byte
    repeated, else WRITE."""
    value = fill_byte(data)
    if value is None:
        return Op.write(offset, data)
    return Op.zero(offset, len(data)) if value == 0 else Op.fill(offset, len(data), value)


def max_write(block_size: int) -> int:
    """The longest WRITE run of whole blocks that still fits one journal record."""
    return max(block_size, (DEFAULT_BUDGET - OP_OVERHEAD) // block_size * block_size)


@dataclass
class RunBuilder:
    """Coalesces adjacent changed blocks of the same kind into WRITE, ZERO and FILL ops.

    ``max_write`` bounds a WRITE op so it fits one journal record.
    """

    max_write: int
    _kind: OpKind | None = None
    _start: int = 0
    _length: int = 0
    _value: int = 0
    _parts: list[memoryview] = field(default_factory=list)

    def add_write(self, offset: int, block: memoryview) -> list[Op]:
        out = self._break_unless(OpKind.WRITE, offset, len(block), self.max_write)
        self._parts.append(block)
        return out

    def add_block(self, offset: int, block: memoryview) -> tuple[list[Op], bool]:
        """Add a block as ZERO, FILL or WRITE by its content; returns (ops, not zeros).

        A block of one repeated byte carries no data: Kafka's compression would store it
        in next to nothing, and an applier's fetch, bounded in stored bytes, would
        decompress thousands of them at once."""
        value = fill_byte(block)
        if value is None:
            return self.add_write(offset, block), True
        if value == 0:
            return self.add_zero(offset, len(block)), False
        return self._break_unless(OpKind.FILL, offset, len(block), MAX_FILL_RUN, value), True

    def add_zero(self, offset: int, length: int) -> list[Op]:
        return self._break_unless(OpKind.ZERO, offset, length, MAX_FILL_RUN)

    def finish(self) -> list[Op]:
        """Emit the open run; call before the buffers behind pending blocks are reused."""
        if self._kind is None:
            return []
        if self._kind is OpKind.WRITE:
            op = Op.write(self._start, b"".join(self._parts))
        elif self._kind is OpKind.FILL:
            op = Op.fill(self._start, self._length, self._value)
        else:
            op = Op.zero(self._start, self._length)
        self._kind, self._parts, self._length = None, [], 0
        return [op]

    def _break_unless(self, kind: OpKind, offset: int, length: int, limit: int,
                      value: int = 0) -> list[Op]:
        out: list[Op] = []
        if (self._kind is not kind or value != self._value
                or offset != self._start + self._length or self._length + length > limit):
            out = self.finish()
            self._kind, self._start, self._value = kind, offset, value
        self._length += length
        return out
