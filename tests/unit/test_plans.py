"""The planner of operator commands (journal/plans.py): who does what, and what is
refused before anything is changed."""
from __future__ import annotations

from dataclasses import replace

import pytest

from journal.errors import BadInput
from journal.pairs import PairSpec, PairState
from journal.status import Acknowledged, forced_loss
from journal.plans import (FRESH_S, Command, NotReady, Sides, SplitBrain, apply_target,
                           plan, serving)
from journal.status import Beat

SPEC = PairSpec("p", "/a.img", "/b.img", 65536, 1 << 20)
NOW = 1_000_000
STEADY = PairState(SPEC, 1)
PROMOTED = PairState(SPEC, 1, state="promoted", reversed=True, promoted_epoch=3)


def beat(volume: str, state: str = "serving", age_s: float = 1.0, capturer: str = "nbd",
         epoch: int = 2, seq: int = 10, captured_at_ms: int = NOW) -> Beat:
    return Beat("p", "capturer", volume, "host", 42, NOW - int(age_s * 1000), state, epoch,
                seq, 0, captured_at_ms, 0.0, {"capturer": capturer})


def sides(source: Beat | None = None, target: Beat | None = None) -> Sides:
    return Sides(source, target, NOW)


def test_a_capturer_serves_only_while_its_beats_are_fresh_and_it_runs():
    assert serving(beat("/a.img"), NOW)
    assert not serving(beat("/a.img", age_s=FRESH_S + 1), NOW)
    assert not serving(beat("/a.img", state="sealed"), NOW)
    assert not serving(beat("/a.img", capturer="scan"), NOW, nbd_only=True)
    assert serving(beat("/a.img", capturer="scan"), NOW)
    assert not serving(None, NOW)


@pytest.mark.parametrize("command", [Command.FAILOVER, Command.VERIFY, Command.RESYNC])
def test_the_live_nbd_capturer_does_the_capturers_part_when_there_is_one(command):
    assert plan(command, STEADY, sides(beat("/a.img"))).ask_capturer
    assert not plan(command, STEADY, sides()).ask_capturer
    assert not plan(command, STEADY, sides(beat("/a.img", capturer="scan"))).ask_capturer


def test_a_promoted_pair_refuses_another_failover_and_names_failback():
    for command in (Command.FAILOVER, Command.FORCE_FAILOVER, Command.VERIFY,
                    Command.RESYNC):
        with pytest.raises(NotReady, match="first run 'x2x pair failback p'"):
            plan(command, PROMOTED, sides())


def test_a_pair_needing_a_resync_can_only_be_resynced():
    st = replace(STEADY, state="needs-resync", reason="seq gap")
    with pytest.raises(NotReady, match=r"needs a resync \(seq gap\); cannot fail over"):
        plan(Command.FAILOVER, st, sides())
    assert plan(Command.RESYNC, st, sides()).spec == SPEC


def test_a_forced_failover_may_finish_a_planned_one_and_warns_of_a_live_source():
    st = replace(STEADY, state="failing-over")
    p = plan(Command.FORCE_FAILOVER, st, sides(beat("/a.img", capturer="scan")))
    assert not p.ask_capturer and "still looks alive" in p.warnings[0]
    assert plan(Command.FORCE_FAILOVER, STEADY, sides()).warnings == ()


def test_failback_runs_in_the_promoted_direction_and_refuses_a_split_brain():
    p = plan(Command.FAILBACK, PROMOTED, sides(beat("/b.img")))
    assert p.spec.source == "/b.img" and p.spec.target == "/a.img" and p.ask_capturer
    with pytest.raises(SplitBrain, match="old source /a.img is still serving writes"):
        plan(Command.FAILBACK, PROMOTED, sides(target=beat("/a.img", capturer="scan")))
    with pytest.raises(NotReady, match="not promoted"):
        plan(Command.FAILBACK, STEADY, sides())


def test_the_rpo_of_a_forced_failover_counts_what_the_source_captured_beyond_the_target():
    held = Acknowledged.journaled(2, 7, 100, NOW - 3000)
    loss = forced_loss(beat("/a.img", epoch=2, seq=10, captured_at_ms=NOW - 500), 2, 7, 100,
                       NOW - 3000, Acknowledged.journaled(2, 8, 101, NOW - 2000))
    assert (loss.epoch, loss.ops) == (2, 3)
    # Nothing unapplied: no loss, whatever the clocks say.
    none = forced_loss(None, 2, 7, 100, NOW - 3000, held)
    assert (none.epoch, none.ops, none.rpo_s) == (2, 0, 0.0)
    # The source went on in a later epoch: every op of it is lost, and it is the epoch
    # the promotion records.
    later = forced_loss(beat("/a.img", epoch=3, seq=4), 2, 7, 100, NOW - 3000, held)
    assert (later.epoch, later.ops) == (3, 4)


def test_apply_refuses_the_old_source_until_failback():
    assert apply_target(STEADY, None) == "/b.img"
    assert apply_target(PROMOTED, "/replica.img") == "/replica.img"
    with pytest.raises(BadInput, match="failback p"):
        apply_target(PROMOTED, None)
