"""Consistency groups' pure rules (journal/groups.py): barriers, the common cut, who may
form or leave a group, the group's status; and the fold of group-set events."""
from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, strategies as st

from journal.errors import BadInput
from journal.events import Created, GroupSet
from journal.groups import (Barrier, barrier_of, barrier_op, check_new_group, check_removal,
                            common_cut, group_members, group_status, next_cut)
from journal.ops import Entry, Op
from journal.pairs import PairSpec, PairState, fold
from journal.status import PairStatus, ReplicaStatus


def _state(name: str, group: str = "", state: str = "created",
           reversed_: bool = False) -> PairState:
    spec = PairSpec(name, f"/{name}.src", f"/{name}.dst", 65536, 1 << 20)
    return PairState(spec, 1, state=state, reversed=reversed_, group=group)


def _entry(*ops: Op) -> Entry:
    return Entry("p", 1, 1, 0, 0, tuple(ops))


def test_a_barrier_is_a_flush_carrying_its_cut_and_the_committed_one():
    op = barrier_op(1_700_000_000_123, 1_700_000_000_000)
    assert barrier_of(_entry(Op.write(0, b"x" * 10), op)) == Barrier(1_700_000_000_123,
                                                                     1_700_000_000_000)
    assert _entry(op).closes_consistency_point


def test_a_plain_flush_or_a_data_entry_is_no_barrier():
    assert barrier_of(_entry(Op.write(0, b"x"), Op.flush())) is None
    assert barrier_of(_entry(Op.write(0, b"x"))) is None
    assert barrier_of(_entry()) is None


@pytest.mark.parametrize("cut,committed", [(0, 0), (5, 5), (5, 9), (5, -1)])
def test_a_barrier_needs_committed_below_its_cut(cut, committed):
    with pytest.raises(ValueError):
        barrier_op(cut, committed)


@given(st.integers(0, 10**13), st.integers(0, 10**13))
def test_cut_ids_increase_even_when_the_clock_steps_back(last, now):
    assert next_cut(last, now) > last and next_cut(last, now) >= now


@given(st.dictionaries(st.sampled_from("abcd"), st.sets(st.integers(1, 30)), min_size=1))
def test_the_common_cut_is_the_newest_every_journal_holds(held):
    cut = common_cut(held)
    everywhere = set.intersection(*held.values())
    assert cut == (max(everywhere) if everywhere else None)


def test_no_members_no_common_cut():
    assert common_cut({}) is None


def test_a_group_of_pairs_in_one_direction_is_accepted():
    pairs = {n: _state(n) for n in ("a", "b")}
    check_new_group("db", pairs, ["a", "b"])


@pytest.mark.parametrize("members,says", [
    ([], "name its pairs"),
    (["a", "a"], "named twice"),
    (["a", "zz"], "no pair named 'zz'"),
    (["a", "c"], "pair c belongs to group other already"),
    (["a", "p"], "same direction"),
    (["a", "r"], "same direction"),
])
def test_bad_groups_are_refused_naming_the_fault(members, says):
    pairs = {"a": _state("a"), "b": _state("b"), "c": _state("c", group="other"),
             "p": _state("p", state="promoted", reversed_=True), "r": _state("r", "", "needs-resync")}
    with pytest.raises(BadInput, match=says):
        check_new_group("db", pairs, members)


def test_joining_a_group_is_checked_against_its_members():
    pairs = {"a": _state("a", group="db"), "p": _state("p", state="promoted", reversed_=True)}
    with pytest.raises(BadInput, match="same direction"):
        check_new_group("db", pairs, ["p"])


def test_an_invalid_group_name_is_refused():
    with pytest.raises(BadInput, match="group name 'a/b' is invalid"):
        check_new_group("a/b", {"a": _state("a")}, ["a"])


def test_removing_a_pair_while_its_group_replicates_is_refused():
    a = _state("a", group="db")
    with pytest.raises(BadInput, match="replicates in group db right now"):
        check_removal("db", a, "a", serving=True)
    with pytest.raises(BadInput, match="not in group db"):
        check_removal("db", _state("a"), "a", serving=False)
    check_removal("db", a, "a", serving=False)


def test_group_set_events_fold_into_membership():
    spec = PairSpec("a", "/a", "/b", 65536, 1 << 20)
    pairs = fold([Created(pair="a", spec=spec, at_ms=1), GroupSet(pair="a", group="db")])
    assert pairs["a"].group == "db" and group_members(pairs, "db") == ["a"]
    pairs = fold([GroupSet(pair="a", group=None)], pairs)
    assert pairs["a"].group == "" and group_members(pairs, "db") == []


def _row(name: str, committed: int, target_cut: int | None, rpo: float | None) -> PairStatus:
    replicas = [] if target_cut is None else [ReplicaStatus(
        f"/{name}.dst", "following", 1, 1, 0, 0, rpo, 0.0, 0.1,
        {"group_cut": str(target_cut)})]
    return PairStatus(name, "capturing", 1, 1, 0.0, 0.1, {"group_cut": str(committed)},
                      replicas)


def test_the_groups_rpo_is_its_worst_member_and_its_cut_the_oldest_target_cut():
    g = group_status("db", {"a": _row("a", 30, 20, 0.4), "b": _row("b", 30, 10, 1.5)},
                     {"a": "/a.dst", "b": "/b.dst"})
    assert g.rpo_s == 1.5 and g.cut == 10
    assert [m.committed_cut for m in g.members] == [30, 30]


def test_a_member_without_its_target_makes_the_groups_rpo_unknown():
    g = group_status("db", {"a": _row("a", 30, 20, 0.4), "b": _row("b", 30, None, None)},
                     {"a": "/a.dst", "b": "/b.dst"})
    assert g.rpo_s is None and g.cut == 0
    assert replace(g.members[1]).target_cut == 0
