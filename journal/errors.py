"""The one exception hierarchy of x2x.

Every message names what is wrong and tells the user what to do next; the CLI prints
``str(error)`` and exits with ``error.exit_code``.
"""
from __future__ import annotations


class X2XError(Exception):
    """Root of every error x2x raises on purpose."""

    exit_code = 1


class BadInput(X2XError):
    """A value given by the user is invalid."""

    exit_code = 2


class PairNotFound(X2XError):
    """No pair of that name exists on the control topic."""


class PairExists(X2XError):
    """A pair of that name exists already."""


class VolumeError(X2XError):
    """A source or target volume is missing, unreadable or of the wrong size."""


class VolumeLost(VolumeError):
    """The connection to a volume served over NBD was lost; it may come back."""


class BrokerError(X2XError):
    """The Kafka cluster could not be reached or refused a request."""


class BacklogFull(BrokerError):
    """The journal's backlog (spool and memory) is full: the broker takes less than the
    source writes. The journal itself is intact and drains."""


class JournalError(X2XError):
    """The journal cannot be applied as it stands; nothing from the bad entry was applied."""


class CorruptEntry(JournalError):
    """A record failed decoding or its digest check."""


class UnknownFingerprint(CorruptEntry):
    """A record was written with a schema this version of x2x does not know."""


class SeqGap(JournalError):
    """An entry's sequence number is not the next one expected."""


class ReplayedEntry(JournalError):
    """An entry that was already applied appears again later in the journal."""


class StaleEpoch(JournalError):
    """An entry belongs to an epoch older than the one already applied."""


class ExtentOutOfRange(JournalError):
    """An op addresses bytes outside the target volume."""


class JournalLost(JournalError):
    """The journal no longer holds the applier's checkpoint (topic recreated or emptied)."""


class BehindBase(JournalError):
    """A reader needs records the history base already applied and the journal deleted;
    the way back is to re-seed it from the base (a copy of the base and its checkpoint)."""


class DigestMismatch(JournalError):
    """After draining to a SEAL, the target's digest differs from the source's."""


class Busy(X2XError):
    """Another process holds the lock this operation needs."""
