"""What a capturer announces on the control topic about its journal's history.

* ``epoch-abandoned``: an epoch given up for a later one (an outage, a crash); appliers
  skip its late records instead of stopping;
* ``resync-needed`` with cause ``journal-lost``: the broker lost the journal's history;
  the target needs a hash resync and nothing can be rebuilt by replay;
* ``baseline-complete``: a full baseline is acknowledged, so replay can build targets again.
"""
from __future__ import annotations

import logging

from infra import control
from infra.kafka import KafkaSettings
from journal.errors import X2XError
from journal.events import BaselineComplete, EpochAbandoned, ResyncNeeded
from journal.pairs import JOURNAL_LOST
from journal.roles import Role

log = logging.getLogger("x2x.capture")


def abandon_epoch(settings: KafkaSettings, pair: str, epoch: int, successor: int) -> None:
    """Announce, before the first record of ``successor``, that ``epoch`` is given up:
    records of it still on their way to the broker (sent before the outage was declared)
    may land after the successor's, and appliers then skip them instead of stopping (the
    successor resends every block they touched, with newer data)."""
    control.publish(settings, EpochAbandoned(pair=pair, epoch=epoch, successor=successor),
                    Role.CAPTURER)


def announce_baseline(settings: KafkaSettings, pair: str, epoch: int) -> None:
    """A full baseline of ``epoch`` is acknowledged: the journal can build targets by
    replay again (after a journal loss). Not fatal: replication goes on without it."""
    try:
        control.publish(settings, BaselineComplete(pair=pair, epoch=epoch), Role.CAPTURER)
    except X2XError as e:
        log.warning("pair %s: could not announce the baseline of epoch %d: %s", pair, epoch, e)


def mark_journal_lost(settings: KafkaSettings, pair: str, source: str, epoch: int) -> None:
    """Say on the control topic that the journal lost its history before ``epoch``: the
    pair needs a hash resync, and no target may be rebuilt by replaying what is left."""
    control.publish(settings, ResyncNeeded(
        pair=pair, cause=JOURNAL_LOST, lost_before_epoch=epoch,
        reason=f"the broker lost the journal of pair {pair} (noticed by the capturer of "
               f"{source}); resync the target by block hashes: 'x2x pair resync {pair}'"),
        Role.CAPTURER)
