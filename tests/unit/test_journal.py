"""The journal's invariants (journal/DESIGN.md), tested without a broker."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from journal.batch import OP_OVERHEAD, Sequencer, join_entries, joinable
from journal.blocks import (HASH_LEN, coalesce, diff_maps, fill_byte, hash_block,
                            hash_buffer, is_zero, zero_hash)
from journal.digest import digest_of
from journal.errors import BadInput, ExtentOutOfRange, SeqGap, StaleEpoch
from journal.ops import Deferred, Entry, Op, OpKind, resolve
from journal.events import Created, Deleted, ResyncNeeded
from journal.pairs import (PairSpec, fold, parse_size, validate_block_size,
                           validate_name)
from journal.runs import RunBuilder, write_op
from journal.sequence import Position, Verdict, check_extents, classify


def entry(epoch: int, first_seq: int, n: int = 1, pair: str = "p") -> Entry:
    return Entry(pair, epoch, first_seq, 0, 0, tuple(Op.zero(0, 1) for _ in range(n)))


# -- ops are contiguous per epoch -----------------------------------------------------
write_ops = st.one_of(
    st.builds(Op.write, st.integers(0, 1 << 30), st.binary(min_size=1, max_size=5000)),
    st.builds(Op.zero, st.integers(0, 1 << 30), st.integers(1, 1 << 20)),
    st.just(Op.flush()),
)


@given(st.lists(write_ops, max_size=60), st.integers(200, 6000))
@settings(max_examples=200, deadline=None)
def test_sequencer_numbers_ops_contiguously_and_respects_budget(ops, budget):
    seq = Sequencer("p", 3, budget=budget)
    entries = [e for op in ops for e in seq.add(op, 5)]
    tail = seq.close(6)
    entries += [tail] if tail else []
    expected = 1
    for e in entries:
        assert e.epoch == 3 and e.first_seq == expected
        expected = e.last_seq + 1
        if len(e.ops) > 1:
            assert sum(len(o.data) + OP_OVERHEAD for o in e.ops) <= budget
        assert e.digest == digest_of(e)
        # A consistency point is always the last op of its entry.
        assert all(o.kind is not OpKind.FLUSH for o in e.ops[:-1])
    # Splitting a large write never changes the bytes written.
    written = {}
    for e in entries:
        for o in e.ops:
            if o.kind is OpKind.WRITE:
                for i, b in enumerate(o.data):
                    written[o.offset + i] = b
    want = {}
    for o in ops:
        if o.kind is OpKind.WRITE:
            for i, b in enumerate(o.data):
                want[o.offset + i] = b
    assert written == want


joined_ops = st.one_of(
    write_ops, st.just(Op.flush()), st.just(Op.flush()),
    st.builds(lambda c: Op(OpKind.FLUSH, c, 0), st.integers(1, 9)),    # a group barrier
    st.builds(Op.hashes, st.just(0), st.just(65536), st.binary(min_size=32, max_size=32)),
    st.builds(lambda d: Op.seal(1 << 20, d), st.binary(min_size=32, max_size=32)),
)


@given(st.lists(joined_ops, max_size=80), st.integers(200, 20000))
@settings(max_examples=200, deadline=None)
def test_queued_entries_join_into_records_that_end_at_their_newest_point(ops, budget):
    seq = Sequencer("p", 2, budget=budget, sign=False)
    entries = queue = [e for op in ops for e in seq.add(op, 5)]
    records = []
    while queue:
        n = joinable(queue, budget)
        assert n >= 1
        records.append(join_entries(queue[:n]))
        parts, queue = queue[:n], queue[n:]
        if n > 1:
            # Only data and plain FLUSHes share a record, within the budget, and a
            # record holding a consistency point ends with one.
            assert all(o.kind in (OpKind.WRITE, OpKind.ZERO, OpKind.FLUSH) for o in
                       records[-1].ops)
            assert all(o.offset == 0 for o in records[-1].ops if o.kind is OpKind.FLUSH)
            assert sum(len(o.data) + OP_OVERHEAD for o in records[-1].ops) <= budget
            if any(p.closes_consistency_point for p in parts):
                assert records[-1].closes_consistency_point
            assert records[-1].epoch_bytes == parts[-1].epoch_bytes
    # The sequencer's ops, in its order, seqs contiguous from 1.
    assert [o for r in records for o in r.ops] == [o for e in entries for o in e.ops]
    expected = 1
    for r in records:
        assert r.first_seq == expected
        expected = r.last_seq + 1


def test_an_entry_that_ends_at_a_point_is_not_joined_with_one_that_does_not():
    a = Entry("p", 1, 1, 10, 4, (Op.write(0, b"abcd"), Op.flush()))
    b = Entry("p", 1, 3, 11, 8, (Op.write(4, b"efgh"),))
    c = Entry("p", 1, 4, 12, 8, (Op.flush(),))
    assert joinable([a, b]) == 1
    assert joinable([a, b, c]) == 3
    joined = join_entries([a, b, c])
    assert (joined.first_seq, joined.last_seq, joined.captured_at_ms,
            joined.epoch_bytes) == (1, 4, 12, 8)
    barrier = Entry("p", 1, 3, 11, 4, (Op(OpKind.FLUSH, 7, 0),))
    assert joinable([a, barrier]) == 1 and joinable([barrier, c]) == 1


def test_epoch_bytes_count_payload():
    seq = Sequencer("p", 1)
    (e,) = seq.add(Op.write(0, b"x" * 10), 1) + seq.add(Op.zero(10, 90), 1) + \
        seq.add(Op.flush(), 1)
    assert e.epoch_bytes == 100 and e.payload_bytes == 100


def test_keyed_digest_differs_from_plain():
    (e,) = Sequencer("p", 1, key=b"k" * 32).add(Op.flush(), 1)
    assert e.digest == digest_of(e, b"k" * 32) != digest_of(e)


# -- what the applier accepts and refuses ---------------------------------------------
def test_next_seq_is_applied():
    assert classify(Position(1, 5), entry(1, 6)) is Verdict.APPLY


def test_replayed_entry_is_a_duplicate_so_replay_is_idempotent():
    assert classify(Position(1, 5), entry(1, 3, 3)) is Verdict.DUPLICATE


def test_seq_gap_is_refused_with_the_missing_range():
    with pytest.raises(SeqGap, match="ops 6..7 are missing"):
        classify(Position(1, 5), entry(1, 8))


def test_new_epoch_must_start_at_one():
    assert classify(Position(1, 500), entry(2, 1)) is Verdict.APPLY
    with pytest.raises(SeqGap, match="epoch 2 starts at seq 4"):
        classify(Position(1, 500), entry(2, 4))


def test_older_epoch_after_newer_is_refused():
    with pytest.raises(StaleEpoch, match="old capturer"):
        classify(Position(3, 1), entry(2, 2))


def test_extent_outside_target_is_refused():
    e = Entry("p", 1, 7, 0, 0, (Op.write(4090, b"x" * 10),))
    with pytest.raises(ExtentOutOfRange, match="op seq 7 .*outside the target of 4096"):
        check_extents(e, 4096)
    check_extents(e, 4100)


def test_write_whose_length_lies_is_refused():
    e = Entry("p", 1, 1, 0, 0, (Op(OpKind.WRITE, 0, 100, b"x"),))
    with pytest.raises(ExtentOutOfRange, match="carries 1 bytes"):
        check_extents(e, 4096)


# -- block hashing ---------------------------------------------------------------------
def test_zero_blocks_hash_like_zero_bytes():
    assert is_zero(memoryview(bytes(4096)))
    assert not is_zero(memoryview(b"\0" * 4095 + b"\1"))
    assert hash_block(memoryview(bytes(4096))) == zero_hash(4096)


@given(st.integers(0, 70_000), st.integers(0, 69_999), st.integers(0, 255),
       st.integers(1, 255))
def test_fill_byte_finds_the_one_byte_that_differs(length, where, value, odd):
    """Any length (a client's write, not a block), any byte repeated, the odd byte
    anywhere in it: a run only as long as the head, and one past a MiB, included."""
    data = bytearray((value,)) * length
    assert fill_byte(memoryview(data)) == (value if length else 0)
    if length > 1:          # one byte is a fill of itself, whatever it is
        data[where % length] = value ^ odd
        assert fill_byte(memoryview(data)) is None


@pytest.mark.parametrize("length", [64, 65, (1 << 20) + 64, (1 << 20) + 65, 3 << 20])
def test_fill_byte_at_the_chunk_edges(length):
    data = bytearray(b"\xff") * length
    assert fill_byte(memoryview(data)) == 0xFF
    data[-1] = 0xFE
    assert fill_byte(memoryview(data)) is None


def test_writes_of_one_repeated_byte_are_journaled_without_data():
    assert write_op(4096, memoryview(bytes(8192))) == Op.zero(4096, 8192)
    assert write_op(0, memoryview(b"\xff" * 512)) == Op.fill(0, 512, 0xFF)
    assert write_op(0, memoryview(b"ab" * 256)).kind is OpKind.WRITE


def test_hash_buffer_and_diff_find_the_changed_blocks():
    a = bytearray(16 * 4096)
    b = bytearray(a)
    b[5 * 4096 + 17] = 1
    b[9 * 4096] = 2
    ha = b"".join(hash_buffer(memoryview(a), 4096))
    hb = b"".join(hash_buffer(memoryview(b), 4096))
    assert len(ha) == 16 * HASH_LEN
    assert diff_maps(ha, hb) == [5, 9]
    assert diff_maps(ha, ha) == []


def test_coalesce_joins_adjacent_blocks_up_to_the_limit():
    ex = list(coalesce([0, 1, 2, 5, 6, 9], 4096, 10 * 4096 - 100, 2 * 4096))
    assert [(e.offset, e.length) for e in ex] == [
        (0, 8192), (8192, 4096), (20480, 8192), (36864, 4096 - 100)]


def test_run_builder_makes_fill_runs_of_one_value_only():
    rb, out = RunBuilder(max_write=16), []
    for i, blk in enumerate([b"xxxx", b"xxxx", b"yyyy", b"\0\0\0\0", b"xxxy", b"xxxx"]):
        ops, not_zeros = rb.add_block(i * 4, memoryview(blk))
        out += ops
        assert not_zeros == (blk != bytes(4))
    out += rb.finish()
    assert out == [Op.fill(0, 8, ord("x")), Op.fill(8, 4, ord("y")), Op.zero(12, 4),
                   Op.write(16, b"xxxy"), Op.fill(20, 4, ord("x"))]


def test_a_fill_op_must_carry_exactly_one_byte():
    check_extents(Entry("p", 1, 1, 0, 0, (Op.fill(0, 4096, 7),)), 4096)
    for data in (b"", b"ab"):
        with pytest.raises(ExtentOutOfRange, match="FILL carrying"):
            check_extents(Entry("p", 1, 1, 0, 0, (Op(OpKind.FILL, 0, 4096, data),)), 4096)
    assert Op.fill(0, 4096, 7).payload_bytes == 4096


def test_run_builder_coalesces_writes_and_zeros():
    rb = RunBuilder(max_write=3 * 4)
    out = []
    for i, blk in enumerate([b"aaaa", b"bbbb", None, None, b"cccc", b"dddd", b"eeee", b"ffff"]):
        out += rb.add_zero(i * 4, 4) if blk is None else rb.add_write(i * 4, memoryview(blk))
    out += rb.finish()
    assert [(o.kind, o.offset, o.length, o.data) for o in out] == [
        (OpKind.WRITE, 0, 8, b"aaaabbbb"), (OpKind.ZERO, 8, 8, b""),
        (OpKind.WRITE, 16, 12, b"ccccddddeeee"), (OpKind.WRITE, 28, 4, b"ffff")]


# -- pairs -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "x" * 201, "ä"])
def test_bad_pair_names_are_refused(bad):
    with pytest.raises(BadInput, match="pair name"):
        validate_name(bad)


def test_sizes_parse_with_binary_units():
    assert parse_size("64KiB") == 65536
    assert parse_size("1M") == 1 << 20
    assert parse_size("4096") == 4096
    with pytest.raises(BadInput, match="size 'lots' is invalid"):
        parse_size("lots")


@pytest.mark.parametrize("bad", [1024, 5000, 8 << 20])
def test_block_size_must_be_power_of_two_in_range(bad):
    with pytest.raises(BadInput, match="block size"):
        validate_block_size(bad)


def test_fold_control_events():
    spec = PairSpec("a", "/s", "/t", 65536, 1 << 20)
    evs = [Created(pair="a", at_ms=1, spec=spec),
           Created(pair="b", at_ms=2, spec=PairSpec("b", "/s", "/t", 65536, 1)),
           Deleted(pair="b", at_ms=3), ResyncNeeded(pair="a", at_ms=4, reason="gap", cause="")]
    pairs = fold(evs)
    assert list(pairs) == ["a"]
    assert pairs["a"].state == "needs-resync" and pairs["a"].reason == "gap"


# -- deferred writes (rule 11) -------------------------------------------------------------
class _Later(Deferred):
    """Bytes an op will carry once read: the pure side of producers/deferred.SourceBytes."""

    def __init__(self, data: bytes, early: bool = False) -> None:
        self.data, self._early, self.taken = data, early, 0

    def __len__(self) -> int:
        return len(self.data)

    @property
    def early(self) -> bool:
        return self._early

    def take(self) -> bytes:
        self.taken += 1
        return self.data


def test_resolve_reads_deferred_bytes_and_counts_held_and_fresh():
    fresh, early = _Later(b"a" * 100), _Later(b"b" * 30, early=True)
    entry = Entry("p", 1, 1, 0, 0, (Op.write(0, fresh), Op.zero(100, 8),
                                     Op.write(200, early), Op.write(300, b"c" * 5)))
    resolved, held, read = resolve(entry)
    assert [op.data for op in resolved.ops] == [b"a" * 100, b"", b"b" * 30, b"c" * 5]
    assert (held, read) == (35, 100) and fresh.taken == early.taken == 1
    # The digest is that of the bytes, as if they had never been deferred.
    plain = Entry("p", 1, 1, 0, 0, tuple(resolved.ops))
    assert digest_of(resolved) == digest_of(plain)


def test_resolve_leaves_an_entry_without_deferred_ops_as_it_is():
    entry = Entry("p", 1, 1, 0, 0, (Op.write(0, b"x" * 10), Op.flush()))
    assert resolve(entry) == (entry, 10, 0) and resolve(entry)[0] is entry


def test_sequencer_never_splits_deferred_bytes():
    seq = Sequencer("p", 1, budget=1024, sign=False)
    seq.add(Op.write(0, _Later(b"x" * seq.max_op_data)), 0)        # fits exactly
    with pytest.raises(ValueError, match="deferred WRITE of 993 bytes exceeds the 992"):
        seq.add(Op.write(0, _Later(b"x" * (seq.max_op_data + 1))), 0)


# -- the entry digest: its byte stream never changes ----------------------------------
def _digest_as_specified(e: Entry, key: bytes | None = None) -> bytes:
    """The digest's definition, one piece at a time: journals already written carry it."""
    import struct

    import blake3
    h = blake3.blake3(key=key) if key else blake3.blake3()
    name = e.pair.encode()
    h.update(struct.pack("<I", len(name)) + name)
    h.update(struct.pack("<qqqq", e.epoch, e.first_seq, e.captured_at_ms, e.epoch_bytes))
    for op in e.ops:
        h.update(struct.pack("<Bqqq", list(OpKind).index(op.kind), op.offset, op.length,
                             len(op.data)))
        h.update(bytes(op.data))
    return h.digest()


@given(st.lists(st.one_of(write_ops, st.builds(Op.write, st.integers(0, 1 << 30),
                                               st.binary(min_size=60_000, max_size=70_000))),
                max_size=12), st.booleans())
@settings(max_examples=100, deadline=None)
def test_the_entry_digest_hashes_the_same_stream_however_it_is_gathered(op_list, keyed):
    e = Entry("pair", 2, 5, 7, 9, tuple(op_list))
    key = b"k" * 32 if keyed else None
    assert digest_of(e, key) == _digest_as_specified(e, key)


def test_the_entry_digest_is_pinned():
    """Computed by the x2x that wrote the first journals (one update per piece)."""
    e = Entry("p", 1, 1, 0, 0, (Op.write(0, b"x" * 100_000), Op.zero(4096, 512), Op.flush()))
    assert digest_of(e).hex()[:16] == _digest_as_specified(e).hex()[:16] == "6d74cbf8aaf0ba92"
