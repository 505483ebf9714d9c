"""Walking a buffer block by block, holes as whole-block spans (journal.blocks.block_spans):
what a baseline and a scan use to pass over a mostly empty volume per hole, not per block."""
from __future__ import annotations

from hypothesis import given, strategies as st

from journal.blocks import HASH_LEN, block_spans, hash_block, zero_hashes_over

BLOCK = 16


@st.composite
def buffers(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    """A buffer's length and sorted, disjoint holes in it, at any byte alignment."""
    length = draw(st.integers(0, 12 * BLOCK + 7))
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=8, unique=True)))
    holes = [(a, b - a) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
    return length, holes


@given(buffers())
def test_the_spans_cover_the_buffer_and_only_whole_blocks_inside_holes_are_one_span(
        buf: tuple[int, list[tuple[int, int]]]) -> None:
    length, holes = buf
    in_hole = bytearray(length)
    for start, size in holes:
        in_hole[start:start + size] = b"\x01" * size
    pos = 0
    for off, size, hole in block_spans(length, BLOCK, holes):
        assert off == pos and size > 0 and off % BLOCK == 0
        if hole:
            assert size % BLOCK == 0, "a hole span is whole blocks"
            assert all(in_hole[off:off + size]), "a hole span lies inside the holes"
        else:
            assert size == min(BLOCK, length - off), "any other span is one block"
            # A whole block inside a hole is never left to be looked at one by one.
            assert not (size == BLOCK and all(in_hole[off:off + size]))
        pos += size
    assert pos == length


def test_a_volume_of_one_hole_is_one_span_and_its_short_tail_a_block() -> None:
    assert list(block_spans(10 * BLOCK + 3, BLOCK, [(0, 10 * BLOCK + 3)])) == [
        (0, 10 * BLOCK, True), (10 * BLOCK, 3, False)]
    assert list(block_spans(2 * BLOCK, BLOCK, [])) == [(0, BLOCK, False),
                                                         (BLOCK, BLOCK, False)]
    # A hole that covers no whole block changes nothing.
    assert list(block_spans(2 * BLOCK, BLOCK, [(3, BLOCK)])) == [(0, BLOCK, False),
                                                                (BLOCK, BLOCK, False)]


@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, BLOCK - 1))
def test_zero_hashes_over_sets_each_blocks_entry_to_its_zero_hash_and_nothing_else(
        first: int, whole: int, tail: int) -> None:
    blocks = first + whole + 1 + 2
    hashes = bytearray(b"\x07" * HASH_LEN * blocks)
    zero_hashes_over(hashes, first * BLOCK, whole * BLOCK + tail, BLOCK)
    for i in range(blocks):
        got = bytes(hashes[i * HASH_LEN:(i + 1) * HASH_LEN])
        if first <= i < first + whole:
            assert got == hash_block(memoryview(bytes(BLOCK))), i
        elif i == first + whole and tail:
            assert got == hash_block(memoryview(bytes(tail))), i
        else:
            assert got == b"\x07" * HASH_LEN, f"block {i} outside the range was changed"
