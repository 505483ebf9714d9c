"""Turning a stream of changed blocks into as few ops as possible."""
from __future__ import annotations

from dataclasses import dataclass, field

from journal.batch import DEFAULT_BUDGET, OP_OVERHEAD
from journal.blocks import is_zero
from journal.ops import Op, OpKind

#: ZERO runs carry no data, so they may be long; a bound keeps one op's meaning obvious.
MAX_ZERO_RUN = 1 << 30


def max_write(block_size: int) -> int:
    """The longest WRITE run of whole blocks that still fits one journal record."""
    return max(block_size, (DEFAULT_BUDGET - OP_OVERHEAD) // block_size * block_size)


@dataclass
class RunBuilder:
    """Coalesces adjacent changed blocks of the same kind into WRITE and ZERO ops.

    ``max_write`` bounds a WRITE op so it fits one journal record.
    """

    max_write: int
    _kind: OpKind | None = None
    _start: int = 0
    _length: int = 0
    _parts: list[memoryview] = field(default_factory=list)

    def add_write(self, offset: int, block: memoryview) -> list[Op]:
        out = self._break_unless(OpKind.WRITE, offset, len(block), self.max_write)
        self._parts.append(block)
        return out

    def add_block(self, offset: int, block: memoryview) -> tuple[list[Op], bool]:
        """Add a block as ZERO or WRITE by its content; returns (ops, carries data)."""
        if is_zero(block):
            return self.add_zero(offset, len(block)), False
        return self.add_write(offset, block), True

    def add_zero(self, offset: int, length: int) -> list[Op]:
        return self._break_unless(OpKind.ZERO, offset, length, MAX_ZERO_RUN)

    def finish(self) -> list[Op]:
        """Emit the open run; call before the buffers behind pending blocks are reused."""
        if self._kind is None:
            return []
        if self._kind is OpKind.WRITE:
            op = Op.write(self._start, b"".join(self._parts))
        else:
            op = Op.zero(self._start, self._length)
        self._kind, self._parts, self._length = None, [], 0
        return [op]

    def _break_unless(self, kind: OpKind, offset: int, length: int, limit: int) -> list[Op]:
        out: list[Op] = []
        if (self._kind is not kind or offset != self._start + self._length
                or self._length + length > limit):
            out = self.finish()
            self._kind, self._start = kind, offset
        self._length += length
        return out
