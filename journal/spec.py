"""A pair's spec: what both sides of a pair agree on. Apart from journal/pairs.py so that
the control events (journal/events.py), which carry it, and the fold of those events
(journal/pairs.py) can both name it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairSpec:
    name: str
    source: str
    target: str
    block_size: int
    volume_size: int
    key_id: str = ""        # set when the journal is encrypted and authenticated
    #: When the pair's ``created`` event was stamped (ms): tells a pair from an earlier
    #: one of the same name. Set by the fold, never published (the event carries it).
    incarnation: int = 0
