"""Consistency groups: the rules for several pairs that fail over as one (DESIGN rule 19).

A group's recovery points are *group cuts*. One capture service serves every volume of
the group; a cut appends a barrier to every member's journal while no change of any
member is between its local write and its journal append, so a cut holds exactly the
changes completed before it, on every disk (if write A completed before write B was
issued, every cut holding B holds A).

A barrier is a FLUSH op whose ``offset`` is the cut's id (a millisecond stamp, unique and
increasing within the group) and whose ``length`` is the newest cut the capture service
knew every member's journal to hold (acknowledged by the broker) when it cut: its
*committed* cut. A FLUSH of a pair outside a group carries 0 in both, so older appliers
read a barrier as the FLUSH it is. Appliers of a group checkpoint only at committed
cuts, so no target ever runs ahead of a cut its siblings cannot reach; a forced group
failover promotes every member at the newest cut all the journals hold.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from journal.errors import BadInput
from journal.ops import Entry, Op, OpKind
from journal.pairs import PairState
from journal.status import PairStatus, detail_int

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def validate_group_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadInput(f"group name {name!r} is invalid: use 1-100 letters, digits, '.', '_' "
                       f"or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Barrier:
    """A group cut as one member's journal holds it."""

    cut: int            # the cut's id (ms stamp)
    committed: int      # the newest cut every member held when this one was made (0: none)


def barrier_op(cut: int, committed: int) -> Op:
    """The FLUSH op that marks group cut ``cut`` in a member's journal."""
    if cut <= 0 or not 0 <= committed < cut:
        raise ValueError(f"a group cut needs 0 <= committed < cut, got {committed}, {cut}")
    return Op(OpKind.FLUSH, cut, committed)


def barrier_of(entry: Entry) -> Barrier | None:
    """The group cut an entry ends with, or None (any other entry, a plain FLUSH)."""
    if not entry.ops:
        return None
    op = entry.ops[-1]
    if op.kind is not OpKind.FLUSH or op.offset <= 0:
        return None
    return Barrier(op.offset, op.length)


def next_cut(last: int, now_ms: int) -> int:
    """The id of the next cut: the time, but always above the last one (clock steps)."""
    return max(now_ms, last + 1)


def common_cut(held: Mapping[str, Iterable[int]]) -> int | None:
    """The newest cut every member's journal holds (None: none in common): where a forced
    group failover promotes every member."""
    sets = [set(cuts) for cuts in held.values()]
    if not sets:
        return None
    common = set.intersection(*sets)
    return max(common) if common else None


def check_new_group(group: str, pairs: Mapping[str, PairState],
                    members: list[str]) -> None:
    """May ``members`` form (or join) ``group``? Raises BadInput naming what is wrong."""
    validate_group_name(group)
    if not members:
        raise BadInput(f"group {group}: name its pairs with --pair NAME (one per disk)")
    dup = sorted({m for m in members if members.count(m) > 1})
    if dup:
        raise BadInput(f"group {group}: pair {dup[0]} is named twice")
    for m in members:
        if m not in pairs:
            known = ", ".join(sorted(pairs)) or "none"
            raise BadInput(f"group {group}: no pair named {m!r} (known pairs: {known})")
        other = pairs[m].group
        if other and other != group:
            raise BadInput(f"pair {m} belongs to group {other} already: a pair is in one "
                           f"group at most; remove it there first ('x2x group remove "
                           f"{other} --pair {m}', with its capture service stopped)")
        if other == group:
            raise BadInput(f"pair {m} is in group {group} already")
    everyone = [pairs[m] for m in members] + [p for p in pairs.values() if p.group == group]
    directions = {(p.reversed, p.state) for p in everyone}
    if len(directions) > 1:
        desc = "; ".join(f"{p.spec.name}: {_direction(p)}" for p in everyone)
        raise BadInput(f"group {group}: its pairs must replicate in the same direction and "
                       f"state, but {desc}. Fail over or fail back the odd ones first")


def _direction(p: PairState) -> str:
    return f"{p.state}{', failed over (target -> source)' if p.reversed else ''}"


def group_members(pairs: Mapping[str, PairState], group: str) -> list[str]:
    """The group's pairs, by name (empty: no such group)."""
    return sorted(p.spec.name for p in pairs.values() if p.group == group)


def check_removal(group: str, pair: PairState | None, name: str, serving: bool) -> None:
    """May ``name`` leave ``group``? Not while its capture service runs: the pair's
    journal would stop getting barriers mid-stream and its applier would have no cut to
    checkpoint at, while the group's other targets go on without it."""
    if pair is None or pair.group != group:
        raise BadInput(f"pair {name} is not in group {group}")
    if serving:
        raise BadInput(f"pair {name} replicates in group {group} right now: stop the group's "
                       f"capture service ('x2x group capture {group}') first, remove the "
                       f"pair, then capture it on its own and the rest as the group")


@dataclass(frozen=True)
class MemberStatus:
    """One member's row in ``x2x group status``."""

    pair: str
    capture_state: str
    committed_cut: int          # the newest cut the capture service knows committed
    target_cut: int             # the cut the pair's own target's checkpoint is at
    rpo_s: float | None         # the pair's own target's RPO (journal/status.py)


@dataclass(frozen=True)
class GroupStatus:
    group: str
    members: list[MemberStatus]

    @property
    def rpo_s(self) -> float | None:
        """The group's RPO: its worst member's (the group recovers at one cut, so what
        the most-behind target lacks is what the group lacks); None if any is unknown."""
        rpos = [m.rpo_s for m in self.members]
        return None if not rpos or None in rpos else max(r for r in rpos if r is not None)

    @property
    def cut(self) -> int:
        """The cut every member's target has reached (0: not all at a cut yet)."""
        return min((m.target_cut for m in self.members), default=0)


def group_status(group: str, rows: Mapping[str, PairStatus],
                 targets: Mapping[str, str]) -> GroupStatus:
    """Join the members' pair statuses (journal/status.py) into the group's."""
    members = []
    for name, r in sorted(rows.items()):
        own = [x for x in r.replicas if x.target == targets.get(name)]
        members.append(MemberStatus(
            name, r.capture_state, detail_int(r.capture_detail.get("group_cut")),
            detail_int(own[0].detail.get("group_cut")) if own else 0,
            own[0].rpo_s if own else None))
    return GroupStatus(group, members)


def check_alone(state: PairState, command: str, instead: str) -> None:
    """Refuse ``command`` on one disk of a group: acting on it alone would leave it at
    another point than its siblings (``instead``: the group command that does it)."""
    if state.group:
        raise BadInput(f"pair {state.spec.name} belongs to group {state.group}: '{command}' "
                       f"would move it alone, away from the group's cut; use '{instead}' "
                       f"(or take it out first: 'x2x group remove {state.group} --pair "
                       f"{state.spec.name}')")
