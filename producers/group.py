"""One capture service for a consistency group: every member's export on one NBD server,
and the group cuts (journal/groups.py, DESIGN rule 19).

Each member is an ordinary :class:`~producers.nbd_capture.NBDCapture` (its own journal,
epochs, bitmap, heartbeats, failover requests) that adds its export to the shared
server. The cutter makes a group cut every ``cut_interval`` while any member changed:
it holds every range lock of every member, so no change of any disk is between its
local write and its journal append, appends the cut's barrier to each journal, and lets
go. A change is replied to only after its append, so the cut holds exactly what was
completed before it, on every disk. A cut is *committed* once the broker acknowledged its
barrier in every journal; the next barrier says so, and appliers checkpoint only there.

Cuts wait while any member cannot promise order (baseline, degraded, resending,
fenced): a target is consistent with its siblings only from the first cut after that.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from journal.clock import now_ms
from journal.groups import barrier_op, next_cut
from producers.nbd_capture import STOP_GRACE, NBDCapture
from producers.publisher import JournalPublisher

log = logging.getLogger("x2x.capture")

#: Default seconds between group cuts: the group's recovery points, so its RPO floor.
GROUP_CUT_INTERVAL = 0.5


@dataclass
class _Cut:
    """A cut whose barriers the broker has not acknowledged in every journal yet."""

    cut: int
    barriers: dict[str, tuple[JournalPublisher, int]]     # member -> (publisher, seq)
    changed: bool             # did any member change since the cut before it


@dataclass
class GroupCapture:
    """The capture service of group ``group``: ``members`` are started captures sharing
    one NBD server (not serving yet); ``start()`` serves and cuts, ``stop()`` ends all."""

    group: str
    members: list[NBDCapture]
    cut_interval: float = GROUP_CUT_INTERVAL
    cuts: int = 0                 # cuts made
    skipped: int = 0              # cut times that passed while a member could not promise order
    committed: int = 0            # the newest cut every journal acknowledged (its id)
    _pending: deque[_Cut] = field(default_factory=deque)
    _last: int = 0
    #: A committed cut holding changes that no barrier has said is committed yet.
    _unannounced: bool = False
    _marks: dict[str, int] = field(default_factory=dict)   # member -> seq of its last barrier
    _halt: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def server(self):
        return self.members[0].server

    def start(self) -> "GroupCapture":
        self.server.start()
        self._thread = threading.Thread(target=self._run, name="x2x-group-cut", daemon=True)
        self._thread.start()
        return self

    def serve(self, stop: threading.Event) -> None:
        """Until ``stop``, a member's fatal error, or every member stopped (sealed)."""
        while not stop.wait(0.5):
            if any(m.fatal for m in self.members) or all(m.stopped for m in self.members):
                break

    def stop(self) -> list:
        """Stop cutting, stop serving every export (requests in flight finish), then stop
        each member cleanly; returns their reports."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
        for m in self.members:
            if hasattr(m, "watch"):
                m.watch.halt()
            m.backend.close()
        self.server.stop(grace=STOP_GRACE)
        return [m.stop() for m in self.members]

    # -- the cutter -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._halt.wait(self.cut_interval):
            try:
                self._settle()
                if self._due():
                    self._cut()
            except Exception:       # noqa: BLE001 - a failed cut must not end the service
                log.exception("group %s: a cut failed; the next one tries again", self.group)
            self._report()

    def _settle(self) -> None:
        """Commit pending cuts, oldest first, once every barrier is acknowledged; a cut
        whose journal was replaced (new epoch) or failed is never committed."""
        while self._pending:
            c = self._pending[0]
            members = {m.spec.name: m for m in self.members}
            if any(pub is not members[n].backend.pub or pub.failed
                   for n, (pub, _) in c.barriers.items()):
                self._pending.popleft()
                continue
            if any(pub.journaled.seq < seq for pub, seq in c.barriers.values()):
                return
            self.committed = c.cut
            self._unannounced = self._unannounced or c.changed
            self._pending.popleft()

    def _changed(self) -> bool:
        """Did any member append anything since its last barrier?"""
        return any(m.backend.pub.appended_seq > self._marks.get(m.spec.name, 0)
                   for m in self.members)

    def _due(self) -> bool:
        """Did any member change since its last barrier, or is a committed cut with
        changes still to be announced by a next one (appliers wait for that)?"""
        return self._changed() or self._unannounced

    def _cut(self) -> None:
        if not all(m.may_barrier() for m in self.members):
            self.skipped += 1
            return
        changed = self._changed()
        cut = next_cut(self._last, now_ms())
        op = barrier_op(cut, self.committed)
        placed: dict[str, tuple[JournalPublisher, int]] = {}
        with contextlib.ExitStack() as held:
            for m in self.members:
                held.enter_context(m.locks.hold_all())
            # Again under the locks: a member may have degraded since.
            if not all(m.may_barrier() for m in self.members):
                self.skipped += 1
                return
            for m in self.members:
                pub = m.backend.pub
                seq = m.backend.point(op)
                if seq is None:
                    break           # it degraded; this cut is never committed
                placed[m.spec.name] = (pub, seq)
        for name, (_, seq) in placed.items():
            self._marks[name] = seq
        self._last = cut
        if len(placed) == len(self.members):
            self._unannounced = False       # this barrier announces ``committed``
            self._pending.append(_Cut(cut, placed, changed))
            self.cuts += 1

    def _report(self) -> None:
        """What each member's heartbeat says of the group (x2x group status)."""
        figures = {"group": self.group, "group_cut": str(self.committed),
                   "group_cuts": str(self.cuts), "group_cuts_skipped": str(self.skipped)}
        for m in self.members:
            m.group_figures = figures
