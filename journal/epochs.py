"""When a capturer starts a new epoch: the rules of DESIGN rule 1, decided here once.

A capturer continues its saved epoch only after a clean stop whose block hash map still
describes the source; anything else (a first run, a stop mid-scan or a crash, a changed
volume or block size, a journal that lost its records) starts the next epoch. A broker
outage ends the epoch it interrupted. After a promotion the promoted side captures in an
epoch above every epoch of the journal.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Saved:
    """What a capturer saved about its last run."""

    epoch: int
    clean: bool
    #: The saved block hash map fits the source as it is now (size, block size).
    map_fits: bool


@dataclass(frozen=True)
class Start:
    """Where a capturer starts."""

    epoch: int
    #: Resume the saved epoch at its next seq (no resend at all).
    continuing: bool
    #: The saved hash map still bounds what a new epoch must resend (else a baseline).
    map_usable: bool


def at_start(saved: Saved | None, journal_lost: bool = False) -> Start:
    """The epoch a capturer starts in, given what it saved."""
    if saved is None or saved.epoch <= 0:
        return Start(1 if saved is None else saved.epoch + 1, False, False)
    if saved.clean and saved.map_fits and not journal_lost:
        return Start(saved.epoch, True, True)
    return Start(saved.epoch + 1, False, saved.map_fits)


def after_outage(epoch: int) -> int:
    """The epoch that resends what an outage may have kept from ``epoch``."""
    return epoch + 1


def after_promotion(promoted_epoch: int, saved_epoch: int | None) -> int | None:
    """The epoch the promoted side captures in after a promotion that recorded
    ``promoted_epoch``, or None if it already captures above it (or nothing was
    promoted)."""
    if promoted_epoch <= 0 or (saved_epoch is not None and saved_epoch > promoted_epoch):
        return None
    return promoted_epoch + 1
