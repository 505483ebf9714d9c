"""DESIGN rule 1, as journal/epochs.py decides it: when a capturer starts a new epoch."""
from __future__ import annotations

from hypothesis import given, strategies as st

from journal.epochs import Saved, Start, after_outage, after_promotion, at_start


def test_a_first_run_starts_epoch_1_with_a_baseline() -> None:
    assert at_start(None) == Start(1, False, False)


def test_a_clean_stop_with_a_fitting_map_continues_its_epoch() -> None:
    assert at_start(Saved(4, True, True)) == Start(4, True, True)


def test_an_unclean_stop_starts_the_next_epoch_and_keeps_a_fitting_map() -> None:
    assert at_start(Saved(4, False, True)) == Start(5, False, True)
    assert at_start(Saved(4, False, False)) == Start(5, False, False)


def test_a_changed_volume_or_a_lost_journal_never_continues() -> None:
    assert at_start(Saved(4, True, False)) == Start(5, False, False)
    assert at_start(Saved(4, True, True), journal_lost=True) == Start(5, False, True)


@given(st.integers(0, 10**6), st.booleans(), st.booleans(), st.booleans())
def test_an_epoch_never_goes_back(epoch: int, clean: bool, fits: bool, lost: bool) -> None:
    start = at_start(Saved(epoch, clean, fits), lost)
    assert start.epoch >= max(epoch, 1)
    assert start.continuing == (start.epoch == epoch)
    assert after_outage(start.epoch) == start.epoch + 1


def test_the_promoted_side_captures_above_every_epoch_of_the_journal() -> None:
    assert after_promotion(0, None) is None
    assert after_promotion(6, None) == 7
    assert after_promotion(6, 3) == 7
    assert after_promotion(6, 7) is None
