"""Counts of the hostile-input tests, printed at the end of the run (tests/conftest.py):
how many random or mutated inputs each target saw and how each was answered."""
from __future__ import annotations

from collections import Counter, defaultdict

#: target -> outcome -> inputs
TALLY: defaultdict[str, Counter[str]] = defaultdict(Counter)


def count(target: str, outcome: str) -> None:
    TALLY[target][outcome] += 1


def summary() -> list[str]:
    return [f"{target}: {sum(c.values())} inputs ("
            + ", ".join(f"{n} {outcome}" for outcome, n in sorted(c.items())) + ")"
            for target, c in sorted(TALLY.items())]
