"""What an operator command reports: the typed results consumers/failover.py fills and
the CLI prints (as text, or as JSON with ``--json``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from journal.blocks import Extent
from journal.errors import X2XError


class Diverged(X2XError):
    """verify found target blocks that differ from the source."""


@dataclass
class FailoverReport:
    """A promotion: planned (``forced`` False: sealed, drained, digest verified, RPO 0)
    or forced (the source lost: promoted at the last consistency point, RPO measured)."""

    pair: str
    promoted: str            # the volume that is the pair's source now
    epoch: int
    seq: int
    forced: bool
    downtime_s: float | None = None     # planned only: writes refused until promoted
    rpo_s: float = 0.0
    rpo_ops: int = 0
    digest: str = ""         # planned only: the sealed source's blake3 (hex)
    warnings: list[str] = field(default_factory=list)
    #: Forced: the most the target can miss (journal/status.Loss.rpo_max_s).
    rpo_max_s: float | None = None
    #: When the promotion was stamped: tells it from another one of the same failover.
    promoted_at_ms: int = 0


@dataclass
class HashDiff:
    """What comparing the block hashes of both sides found (verify, failback, resync),
    and what was sent to make them equal."""

    blocks: int
    differing: int
    extents: list[Extent]
    hash_bytes: int
    resent_bytes: int
    epoch: int
    seq: int

    @property
    def bytes_sent(self) -> int:
        return self.hash_bytes + self.resent_bytes
