"""Group failover: every member of a consistency group promoted at one group cut.

Planned: each member sealed and drained in turn (a sealed disk refuses writes, so what
the others take meanwhile cannot depend on a write it missed); RPO 0. Forced: the
journals are read from each target's checkpoint to their end for the group cuts they
hold; the newest cut all of them hold is where every member is promoted (each drained up
to that cut's barrier, never past it), and the group's RPO is its worst member's.
"""
from __future__ import annotations

import datetime as dt
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from consumers import failover as fo, replica
from consumers.applier import ApplyStats
from consumers.checkpoint import CheckpointStore
from infra import control
from infra.kafka import KafkaSettings
from infra.reader import read_many
from infra.topics import journal_topic
from journal.errors import BadInput, Busy, X2XError
from journal.groups import barrier_of, common_cut, group_members
from journal.pairs import PairState
from journal.plans import Command
from journal.reports import FailoverReport
from journal.sequence import Limit
from schemas.cipher import JournalKey, open_record


@dataclass
class GroupReport:
    """A group failover: one cut, one RPO, each member's promotion."""

    group: str
    forced: bool
    cut: int                     # the group cut every member is at (0: planned, sealed)
    rpo_s: float
    rpo_max_s: float | None
    members: list[FailoverReport] = field(default_factory=list)

    @property
    def cut_time(self) -> str:
        return _utc(self.cut) if self.cut else ""


def members_of(settings: KafkaSettings, group: str) -> dict[str, PairState]:
    """The group's pairs and their states; BadInput if there is no such group."""
    pairs = control.pairs(settings)
    names = group_members(pairs, group)
    if not names:
        groups = sorted({p.group for p in pairs.values() if p.group}) or ["none"]
        raise BadInput(f"no group named {group!r} (known groups: {', '.join(groups)}); "
                       f"create it with 'x2x group create {group} --pair A --pair B'")
    return {n: pairs[n] for n in names}


def cuts_held(settings: KafkaSettings, states: dict[str, PairState],
              keys: dict[str, JournalKey | None], from_start: bool,
              timeout: float) -> dict[str, dict[int, int]]:
    """Per member, the group cuts its journal holds: cut id -> offset of its barrier;
    read from the target's checkpoint on (``from_start``: the journal's start)."""
    starts, names = {}, {}
    for name, st in states.items():
        cp = CheckpointStore(name, st.active_spec.target).load()
        starts[journal_topic(name)] = 0 if from_start or cp is None else cp.position.offset
        names[journal_topic(name)] = name
    held: dict[str, dict[int, int]] = {n: {} for n in states}
    for topic, msg in read_many(settings, starts, timeout):
        name = names[topic]
        entry = open_record(msg.value(), name, keys[name], f"{topic} offset {msg.offset()}")
        b = barrier_of(entry)
        if b is not None:
            held[name][b.cut] = msg.offset()
    return held


def choose_cut(settings: KafkaSettings, group: str, states: dict[str, PairState],
               keys: dict[str, JournalKey | None], at_ms: int | None, timeout: float,
               what: str) -> tuple[int, dict[str, int]]:
    """The newest cut every member's journal holds (at or before ``at_ms``, read from the
    journals' start; else from each target's checkpoint), and its barrier's offset in
    each journal; raises naming why there is none (nothing was ``what``)."""
    held = cuts_held(settings, states, keys, at_ms is not None, timeout)
    if at_ms is not None:
        held = {n: {c: o for c, o in cuts.items() if c <= at_ms} for n, cuts in held.items()}
    cut = common_cut({n: cuts.keys() for n, cuts in held.items()})
    if cut is None:
        bare = [n for n, cuts in held.items() if not cuts]
        where = "at or before that time" if at_ms is not None else "after its target's checkpoint"
        raise X2XError(
            f"group {group}: no group cut is held by every member's journal"
            + (f" ({', '.join(bare)} holds none {where})" if bare else "")
            + f". Nothing was {what}. Was the group captured with 'x2x group capture "
            f"{group}' until a first cut, with every baseline finished? Handle the pairs one "
            f"by one only if their consistency with each other does not matter")
    return cut, {n: held[n][cut] for n in states}


def _utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(
        timespec="milliseconds")


def failover(settings: KafkaSettings, group: str,
             operation: Callable[[str], fo.Operation], force: bool,
             at_ms: int | None = None, base: str | None = None,
             say: Callable[[str], None] = lambda _: None) -> GroupReport:
    """Promote every member of ``group`` at one cut (see the module doc)."""
    states = members_of(settings, group)
    ops = {n: operation(n) for n in states}
    # Every member's plan first: a member that may not fail over stops the group's
    # failover before any member is promoted.
    for n in states:
        fo.begin(ops[n], Command.FORCE_FAILOVER if force else Command.FAILOVER)
    if force:
        # A forced failover drains every target itself: an applier still holding one
        # would stop the group half promoted, so every target is checked first.
        for n, st in states.items():
            try:
                with CheckpointStore(n, st.active_spec.target).lock():
                    pass
            except Busy as e:
                raise Busy(f"group {group}: {e}; a forced group failover drains every "
                           f"target itself: stop the appliers of every member first. "
                           f"Nothing was promoted") from None
    else:
        reports = [fo.failover(ops[n]) for n in states]
        return GroupReport(group, False, 0, 0.0, 0.0, reports)
    cut, at = choose_cut(settings, group, states, {n: o.key for n, o in ops.items()},
                         at_ms, max(o.timeout for o in ops.values()), "promoted")
    say(f"promoting every member at group cut {cut} ({_utc(cut)})")
    reports = []
    for n in states:
        say(f"{n}: draining up to the cut's barrier at offset {at[n]}")
        reports.append(fo.force_failover(ops[n], Limit(offset=at[n]), base))
    bounds = [r.rpo_max_s for r in reports]
    return GroupReport(group, True, cut, max(r.rpo_s for r in reports),
                       None if None in bounds else max(b for b in bounds if b is not None),
                       reports)


def replicas(settings: KafkaSettings, group: str, target_dir: str,
             keys: dict[str, JournalKey | None], at_ms: int | None, timeout: float,
             stop: threading.Event | None = None) -> tuple[int, dict[str, ApplyStats]]:
    """Extra replicas of every member, ``target_dir/PAIR.img``: at the newest common cut
    at or before ``at_ms`` (a point in time of the whole group), or live-following until
    ``stop`` (each checkpointing at the group's committed cuts); returns the cut (0:
    live) and each member's stats."""
    states = members_of(settings, group)
    targets = {n: os.path.join(target_dir, f"{n}.img") for n in states}
    cut, at = (choose_cut(settings, group, states, keys, at_ms, timeout, "built")
               if at_ms is not None else (0, {}))
    out: dict[str, ApplyStats] = {}
    failed: dict[str, Exception] = {}
    os.makedirs(target_dir, exist_ok=True)

    def one(n: str) -> None:
        limit = Limit(offset=at[n]) if cut else None
        try:
            _, out[n] = replica.build(states[n].spec, targets[n], settings, limit, stop=stop,
                                      key=keys[n])
        except Exception as e:      # noqa: BLE001 - reported below, whatever it was
            failed[n] = e
    threads = [threading.Thread(target=one, args=(n,), name=f"x2x-replica-{n}")
               for n in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        n, e = next(iter(failed.items()))
        kind = type(e) if isinstance(e, X2XError) else X2XError
        raise kind(f"group {group}: the replica of {n} failed: {e}")
    return cut, out
