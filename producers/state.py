"""The capturer's own durable state: epoch, next seq and the block hash map of the source.

``clean`` is false while a scan is being published; finding it false at start means the
last run died mid-scan, so the next one starts a new epoch and resends everything that
changed since the last complete scan.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from infra.files import atomic_write, read_json, read_whole, write_json
from infra.paths import pair_dir
from journal import epochs
from journal.blocks import HASH_LEN, block_count


class Position(Protocol):
    """What the publisher says the broker acknowledged last (``publisher.Journaled``)."""

    epoch: int
    seq: int
    epoch_bytes: int


@dataclass
class CaptureState:
    epoch: int = 0
    next_seq: int = 1
    epoch_bytes: int = 0
    clean: bool = True
    block_size: int = 0
    volume_size: int = 0
    #: The newest record the broker acknowledged (offset, entry digest hex): lets the
    #: next start notice a journal that lost its history meanwhile (-1: none known).
    last_offset: int = -1
    last_digest: str = ""
    #: When the pair this state belongs to was created (its control event): a pair
    #: deleted and created again under the same name must not inherit it (0: unknown).
    pair_created_ms: int = 0

    @classmethod
    def opening(cls, epoch: int, block_size: int, volume_size: int) -> "CaptureState":
        """A new epoch from seq 1, not clean until it stops cleanly."""
        return cls(epoch, 1, 0, False, block_size, volume_size)

    @classmethod
    def closed(cls, journaled: Position, block_size: int, volume_size: int,
               last_offset: int = -1, last_digest: str = "") -> "CaptureState":
        """After a clean stop: everything up to ``journaled`` is in the journal."""
        return cls(journaled.epoch, journaled.seq + 1, journaled.epoch_bytes, True,
                   block_size, volume_size, last_offset, last_digest)


def plan_start(saved: CaptureState | None, hashes: bytearray | None, block_size: int,
               volume_size: int, journal_lost: bool = False
               ) -> tuple[CaptureState, bytearray | None]:
    """The state a capturer starts with (journal/epochs.py decides the epoch), and the
    saved hash map where it still bounds what must be sent (None: a full baseline)."""
    fits = (saved is not None and hashes is not None and saved.block_size == block_size
            and saved.volume_size == volume_size
            and len(hashes) == block_count(volume_size, block_size) * HASH_LEN)
    start = epochs.at_start(
        None if saved is None else epochs.Saved(saved.epoch, saved.clean, fits), journal_lost)
    if start.continuing and saved is not None:
        return saved, hashes
    state = CaptureState.opening(start.epoch, block_size, volume_size)
    if saved is not None and not journal_lost:
        # Until this epoch's first acknowledgement, the last record of the old one is
        # what a later start checks the journal against.
        state.last_offset, state.last_digest = saved.last_offset, saved.last_digest
    return state, hashes if start.map_usable else None


class StateStore:
    """``incarnation``: the pair's creation time; when set, a saved state of another
    incarnation (a deleted pair of the same name) loads as no state at all."""

    def __init__(self, pair: str, directory: Path | None = None, incarnation: int = 0) -> None:
        d = directory or pair_dir(pair)
        self.pair, self.incarnation = pair, incarnation
        self.meta = d / "capture.json"
        self.hashes = d / "capture.hashes"

    def load(self) -> tuple[CaptureState | None, bytearray | None]:
        """The saved state and hash map (None, None: none, or another incarnation's)."""
        state = self.load_state()
        # Read into the one buffer the capturer then keeps and updates in place.
        return state, (read_whole(self.hashes) if state is not None else None)

    def load_state(self) -> CaptureState | None:
        """The saved state alone, without reading the hash map (32 bytes a block: a
        GiB at 2 TiB in 64 KiB blocks)."""
        raw = read_json(self.meta)
        if raw is None:
            return None
        state = CaptureState(**raw)
        if self.incarnation and state.pair_created_ms not in (0, self.incarnation):
            logging.getLogger("x2x.capture").warning(
                "pair %s was deleted and created again since this host last captured it: "
                "the old capture state is set aside (a full baseline follows)", self.pair)
            return None
        return state

    def save(self, state: CaptureState, hashes: bytes | bytearray | None = None) -> None:
        """Write hashes first, then the state that vouches for them. ``hashes`` is
        written as given, not copied: nobody may change it meanwhile."""
        if self.incarnation:
            state.pair_created_ms = self.incarnation
        if hashes is not None:
            atomic_write(self.hashes, hashes)
        write_json(self.meta, asdict(state))
