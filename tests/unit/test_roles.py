"""Who may publish which control event (journal/roles.py): the table ACLs rely on."""
from __future__ import annotations

import pytest

from journal.roles import PUBLISHERS, Role, may_publish

LIFECYCLE = ("created", "deleted", "failover-requested", "failover-failed",
             "failback-started", "failback-done", "resynced", "hashes-requested",
             "resend-requested")


@pytest.mark.parametrize("event", LIFECYCLE)
def test_only_an_operator_changes_a_pairs_life_or_asks_a_capturer(event: str) -> None:
    assert may_publish(Role.OPERATOR, event)
    assert not may_publish(Role.CAPTURER, event)
    assert not may_publish(Role.APPLIER, event)


def test_a_capturer_cannot_promote_and_an_applier_cannot_answer_for_a_capturer() -> None:
    assert not may_publish(Role.CAPTURER, "promoted")
    assert may_publish(Role.APPLIER, "promoted")
    for answer in ("sealed", "hashes-published", "resent", "request-failed",
                   "baseline-complete", "epoch-abandoned"):
        assert may_publish(Role.CAPTURER, answer)
        assert not may_publish(Role.APPLIER, answer)


def test_an_unknown_event_is_the_operators_alone() -> None:
    assert may_publish(Role.OPERATOR, "from-a-newer-x2x")
    assert not may_publish(Role.CAPTURER, "from-a-newer-x2x")
    assert not may_publish(Role.APPLIER, "from-a-newer-x2x")


def test_the_table_names_no_operator_entries() -> None:
    # The operator may publish everything; listing it would suggest otherwise.
    assert all(Role.OPERATOR not in roles for roles in PUBLISHERS.values())
