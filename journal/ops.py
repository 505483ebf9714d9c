"""Journal ops and entries: the records the capturers publish and the appliers replay."""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field, replace


class OpKind(enum.Enum):
    """What one op does to the target."""

    WRITE = "WRITE"   # data at offset
    ZERO = "ZERO"     # length bytes at offset read back as zeros
    TRIM = "TRIM"     # length bytes at offset may be discarded (x2x makes them read as zeros)
    FLUSH = "FLUSH"   # consistency point: everything before it is durable on the source
    SEAL = "SEAL"     # end of a generation; data holds the source's whole-volume digest
    HASHES = "HASHES"  # data: blake3 of each block of [offset, offset+length) on the source,
    #                    read at exactly this journal position (verify, failback)
    FILL = "FILL"     # length bytes at offset all equal data's one byte (not zero: ZERO is)

    # Members are singletons compared by identity: hashing them by identity is the same
    # and runs in C, where Enum's own __hash__ is a Python call (four per client write,
    # for the kind sets below).
    __hash__ = object.__hash__


#: Kinds that change bytes of the target, at ``[offset, offset + length)``.
CHANGING_KINDS = frozenset({OpKind.WRITE, OpKind.ZERO, OpKind.TRIM, OpKind.FILL})

#: Kinds that end an entry: the applier checkpoints only at record boundaries, so a
#: record's newest consistency point must be its last op (journal/DESIGN.md rule 2).
CLOSING_KINDS = frozenset({OpKind.FLUSH, OpKind.SEAL})


class Deferred(abc.ABC):
    """A WRITE's bytes not read yet: they still lie on the source, and are read when the
    journal gets to them (or earlier, by whoever is about to change them). Only the
    publisher's writer ever sees one; entries are resolved before they are signed."""

    __slots__ = ()

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def take(self) -> bytes:
        """The bytes, read now if nobody read them before."""

    @property
    @abc.abstractmethod
    def early(self) -> bool:
        """Were they read before ``take`` (so already held in memory)?"""


@dataclass(frozen=True, slots=True)
class Op:
    """One op; ``data`` is set for WRITE (the bytes) and SEAL (the volume digest).

    ``data`` may be a memoryview (the hot write path does not copy): whoever makes the
    op promises the bytes behind it do not change afterwards. It may also be a
    :class:`Deferred`, whose maker promises to read the bytes before they change."""

    kind: OpKind
    offset: int = 0
    length: int = 0
    data: bytes | memoryview | Deferred = b""

    @staticmethod
    def write(offset: int, data: bytes | memoryview) -> "Op":
        return Op(OpKind.WRITE, offset, len(data), data)

    @staticmethod
    def zero(offset: int, length: int) -> "Op":
        return Op(OpKind.ZERO, offset, length)

    @staticmethod
    def fill(offset: int, length: int, value: int) -> "Op":
        return Op(OpKind.FILL, offset, length, bytes((value,)))

    @staticmethod
    def trim(offset: int, length: int) -> "Op":
        return Op(OpKind.TRIM, offset, length)

    @staticmethod
    def flush() -> "Op":
        return Op(OpKind.FLUSH)

    @staticmethod
    def seal(volume_size: int, digest: bytes) -> "Op":
        return Op(OpKind.SEAL, 0, volume_size, digest)

    @staticmethod
    def hashes(offset: int, length: int, hashes: bytes) -> "Op":
        return Op(OpKind.HASHES, offset, length, hashes)

    @property
    def payload_bytes(self) -> int:
        """Bytes this op changes on the target (what lag in bytes counts)."""
        return self.length if self.kind in CHANGING_KINDS else 0


@dataclass(frozen=True, slots=True)
class Entry:
    """One Kafka record of a pair's journal: ops ``first_seq .. last_seq`` of ``epoch``.

    ``epoch_bytes`` counts the payload bytes journaled in this epoch up to and including
    this entry, so lag in bytes is a subtraction; ``captured_at_ms`` is when the capturer
    closed the entry, which is what RPO is measured against.
    """

    pair: str
    epoch: int
    first_seq: int
    captured_at_ms: int
    epoch_bytes: int
    ops: tuple[Op, ...]
    digest: bytes = field(default=b"", compare=False)
    cipher: str = ""        # "" (plain) or the AEAD the op data is encrypted with

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.ops) - 1

    @property
    def closes_consistency_point(self) -> bool:
        return bool(self.ops) and self.ops[-1].kind in CLOSING_KINDS

    @property
    def payload_bytes(self) -> int:
        return sum(op.payload_bytes for op in self.ops)


def resolve(entry: Entry) -> tuple[Entry, int, int]:
    """``entry`` with every :class:`Deferred` read, and of its payload the bytes that
    were already held in memory and those read just now from the source."""
    if not any(isinstance(op.data, Deferred) for op in entry.ops):
        return entry, sum(len(op.data) for op in entry.ops), 0
    held = fresh = 0
    ops: list[Op] = []
    for op in entry.ops:
        if isinstance(op.data, Deferred):
            data = op.data.take()
            if op.data.early:
                held += len(data)
            else:
                fresh += len(data)
            op = replace(op, data=data)
        else:
            held += len(op.data)
        ops.append(op)
    return replace(entry, ops=tuple(ops)), held, fresh
