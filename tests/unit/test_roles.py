"""Who may publish which control event (journal/roles.py): the table ACLs rely on."""
from __future__ import annotations

import pytest

from journal.events import (KINDS, BaselineComplete, Created, Deleted, EpochAbandoned, Event,
                            FailbackDone, FailbackStarted, FailoverFailed, FailoverRequested,
                            HashesPublished, HashesRequested, Promoted, RequestFailed,
                            ResendRequested, Resent, Resynced, Sealed)
from journal.roles import PUBLISHERS, Role, may_publish

LIFECYCLE = (Created, Deleted, FailoverRequested, FailoverFailed, FailbackStarted,
             FailbackDone, Resynced, HashesRequested, ResendRequested)


@pytest.mark.parametrize("kind", LIFECYCLE, ids=lambda k: k.NAME)
def test_only_an_operator_changes_a_pairs_life_or_asks_a_capturer(kind: type[Event]) -> None:
    assert may_publish(Role.OPERATOR, kind)
    assert not may_publish(Role.CAPTURER, kind)
    assert not may_publish(Role.APPLIER, kind)


def test_a_capturer_cannot_promote_and_an_applier_cannot_answer_for_a_capturer() -> None:
    assert not may_publish(Role.CAPTURER, Promoted)
    assert may_publish(Role.APPLIER, Promoted)
    for answer in (Sealed, HashesPublished, Resent, RequestFailed, BaselineComplete,
                   EpochAbandoned):
        assert may_publish(Role.CAPTURER, answer)
        assert not may_publish(Role.APPLIER, answer)


def test_every_kind_is_the_operators_and_the_table_names_only_known_kinds() -> None:
    assert all(may_publish(Role.OPERATOR, kind) for kind in KINDS.values())
    assert set(PUBLISHERS) <= set(KINDS.values())


def test_the_table_names_no_operator_entries() -> None:
    # The operator may publish everything; listing it would suggest otherwise.
    assert all(Role.OPERATOR not in roles for roles in PUBLISHERS.values())
