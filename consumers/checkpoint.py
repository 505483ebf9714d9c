"""The applier's checkpoint: the recovery point of one target volume.

Written atomically, and only after the target was fsynced, so after any crash the
checkpoint never claims more than the target holds.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterator
from pathlib import Path

from infra.files import read_json, write_json
from infra.paths import pair_dir, volume_key
from journal.errors import Busy
from journal.sequence import Position


@dataclass(frozen=True)
class Checkpoint:
    pair: str
    target: str
    position: Position
    entry_digest: str        # hex digest of the entry at position.offset: proves the topic is the same
    written_at_ms: int


class CheckpointStore:
    """One checkpoint file per (pair, target volume), under ``$X2X_HOME/pairs/<pair>/``."""

    def __init__(self, pair: str, target: str, directory: Path | None = None) -> None:
        self.pair, self.target = pair, target
        self.path = (directory or pair_dir(pair)) / f"checkpoint-{volume_key(target)}.json"

    def load(self) -> Checkpoint | None:
        raw = read_json(self.path)
        if raw is None:
            return None
        return Checkpoint(raw["pair"], raw["target"], Position(**raw["position"]),
                          raw["entry_digest"], raw["written_at_ms"])

    def save(self, cp: Checkpoint) -> None:
        write_json(self.path, asdict(cp))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the target exclusively: two appliers on one target would interleave.
        ``wait``: seconds to keep trying (a history base frees its lock between cycles)."""
        lock_path = self.path.with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise Busy(f"another applier (pid {holder}) is applying pair {self.pair} "
                               f"to {self.target}; stop it first, or wait for it to finish"
                               ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)
