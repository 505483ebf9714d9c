"""The pair state machine of failover/failback, folded from control events."""
from __future__ import annotations

from journal.blocks import Extent, format_extents, parse_extents
from journal.events import (BaselineComplete, Created, EpochAbandoned, Event, FailbackDone,
                            FailbackStarted, FailoverFailed, FailoverRequested, Promoted,
                            ResyncNeeded, Resynced, Sealed)
from journal.pairs import JOURNAL_LOST, PairSpec, fold

SPEC = PairSpec("p", "/a.img", "/b.img", 65536, 1 << 20)
#: What each kind needs besides the fields a test sets.
_FILL: dict[type[Event], dict] = {
    Created: dict(spec=SPEC),
    FailoverRequested: dict(source="/a.img", forced=False),
    Sealed: dict(source="/a.img", epoch=1, seq=1, digest=b"", refused_at_ms=0),
    Promoted: dict(volume="/b.img", epoch=0, seq=0, forced=False, rpo_s=0.0, rpo_ops=0,
                   promoted_at_ms=0),
    FailoverFailed: dict(reason="it failed"),
    FailbackStarted: dict(target="/a.img"),
    FailbackDone: dict(target="/a.img", differing=0, bytes_sent=0),
    ResyncNeeded: dict(reason="", cause=""),
    Resynced: dict(target="/b.img", differing=0, bytes_sent=0, epoch=1),
    BaselineComplete: dict(epoch=1),
    EpochAbandoned: dict(epoch=0, successor=0),
}


def ev(kind: type[Event], **fields) -> Event:
    return kind(pair="p", at_ms=0, **{**_FILL[kind], **fields})


def test_planned_failover_reverses_the_direction_and_records_the_epoch():
    st = fold([ev(Created), ev(FailoverRequested),
               ev(Sealed, epoch=3, seq=99), ev(Promoted, epoch=3, seq=99)])["p"]
    assert st.state == "promoted" and st.reversed and st.promoted_epoch == 3
    assert st.active_spec.source == "/b.img" and st.active_spec.target == "/a.img"
    assert st.promotion is not None and st.promotion.seq == 99


def test_failback_then_second_failover_returns_to_the_original_side():
    evs = [ev(Created), ev(FailoverRequested), ev(Promoted, epoch=1),
           ev(FailbackStarted), ev(FailbackDone)]
    st = fold(evs)["p"]
    assert st.state == "replicating" and st.reversed and st.replicating
    st = fold(evs + [ev(FailoverRequested), ev(Promoted, epoch=2)])["p"]
    assert st.state == "promoted" and not st.reversed and st.promoted_epoch == 2
    assert st.active_spec == SPEC


def test_a_duplicate_promoted_does_not_flip_the_direction_back():
    st = fold([ev(Created), ev(FailoverRequested), ev(Promoted, epoch=1),
               ev(Promoted, epoch=1)])["p"]
    assert st.reversed and st.state == "promoted"


def test_a_failed_failover_leaves_the_pair_as_it_was():
    st = fold([ev(Created), ev(FailoverRequested), ev(FailoverFailed)])["p"]
    assert st.state == "created" and not st.reversed


def test_failback_only_starts_from_promoted():
    st = fold([ev(Created), ev(FailbackStarted), ev(FailbackDone)])["p"]
    assert st.state == "created" and not st.reversed


def test_a_seal_digest_mismatch_needs_a_resync_and_promotes_nothing():
    st = fold([ev(Created), ev(FailoverRequested), ev(Sealed, epoch=1),
               ev(ResyncNeeded, reason="digest")])["p"]
    assert st.state == "needs-resync" and not st.reversed
    # A late promoted (it cannot come from a mismatching applier) is not taken either.
    assert not fold([ev(Created), ev(ResyncNeeded), ev(Promoted)])["p"].reversed


def test_a_lost_journal_holds_until_a_hash_resync_and_only_then():
    lost = [ev(Created), ev(ResyncNeeded, cause=JOURNAL_LOST, reason="broker lost it")]
    assert fold(lost)["p"].journal_lost
    st = fold(lost + [ev(Resynced)])["p"]
    assert st.state == "created" and not st.journal_lost and st.cause == "" == st.reason
    # A later need of another cause is not mistaken for a lost journal.
    st = fold(lost + [ev(Resynced), ev(ResyncNeeded, reason="seq gap")])["p"]
    assert st.state == "needs-resync" and not st.journal_lost


def test_a_lost_history_is_not_replayable_until_a_full_baseline_not_a_resync():
    lost = [ev(Created), ev(ResyncNeeded, cause=JOURNAL_LOST)]
    assert fold([ev(Created)])["p"].replayable
    assert not fold(lost)["p"].replayable
    assert not fold(lost + [ev(Resynced)])["p"].replayable      # the target only
    st = fold(lost + [ev(Resynced), ev(BaselineComplete, epoch=4)])["p"]
    assert st.replayable and st.state == "created"
    assert fold([ev(Created), ev(ResyncNeeded, reason="gap")])["p"].replayable


def test_abandoned_epochs_accumulate_and_survive_other_events():
    st = fold([ev(Created), ev(EpochAbandoned, epoch=1, successor=2),
               ev(ResyncNeeded), ev(Resynced),
               ev(EpochAbandoned, epoch=3, successor=4), ev(EpochAbandoned)])["p"]
    assert st.abandoned_epochs == {1, 3}


def test_extents_round_trip_through_their_text_form():
    exts = [Extent(0, 65536), Extent(1 << 20, 3 * 65536)]
    assert parse_extents(format_extents(exts)) == exts
    assert parse_extents("") == []


def test_a_hashes_op_round_trips_and_must_lie_inside_the_target():
    import pytest

    from journal.batch import Sequencer
    from journal.errors import ExtentOutOfRange
    from journal.ops import Op, OpKind
    from journal.sequence import check_extents
    from schemas import codec

    seq = Sequencer("p", 2)
    (entry,) = seq.add(Op.hashes(0, 131072, b"\x01" * 64), 5) + seq.add(Op.flush(), 5)
    back = codec.decode_entry(codec.encode_entry(entry))
    assert back.ops[0].kind is OpKind.HASHES and back.ops[0].data == b"\x01" * 64
    assert back.payload_bytes == 0           # HASHES change nothing on the target
    check_extents(back, 131072)
    with pytest.raises(ExtentOutOfRange):
        check_extents(back, 65536)


def test_entries_written_before_the_hashes_and_fill_kinds_still_decode():
    from journal.ops import Entry, Op
    from schemas import codec

    e = Entry("p", 1, 1, 5, 3, (Op.write(0, b"abc"), Op.flush()), b"d" * 32)
    for older in (codec.ENTRY_V1, codec.ENTRY_V2):
        old = codec.encode(older, {
            "pair": e.pair, "epoch": e.epoch, "first_seq": e.first_seq,
            "captured_at_ms": e.captured_at_ms, "epoch_bytes": e.epoch_bytes,
            "ops": [{"kind": o.kind.value, "offset": o.offset, "length": o.length,
                     "data": o.data} for o in e.ops], "digest": e.digest, "cipher": ""})
        assert old[2:10] != codec.ENTRY.fingerprint
        assert codec.decode_entry(old) == e
