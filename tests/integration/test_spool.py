"""The async capturer's disk spool: a FIFO that keeps order and gives space back."""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from journal.errors import BadInput
from producers.spool import Spool, max_from_env

# Pushes (a record of n bytes) and pops, in any interleaving.
# (record size, size of the buffers it is pushed as: small ones exceed one pwritev's limit)
_steps = st.lists(st.one_of(st.tuples(st.integers(0, 70_000), st.sampled_from([50, 4096, 70_000])),
                            st.none()), max_size=60)


@settings(max_examples=200, deadline=None)
@given(steps=_steps)
def test_spool_is_a_fifo_across_segments(tmp_path_factory, steps) -> None:
    spool = Spool(tmp_path_factory.mktemp("spool"), segment=50_000)
    model: deque[bytes] = deque()
    for step in steps:
        if step is None:
            assert spool.pop() == (model.popleft() if model else None)
        else:
            size, piece = step
            value = os.urandom(size)
            spool.push([memoryview(value)[i:i + piece] for i in range(0, size, piece)])
            model.append(value)
        assert (len(spool), spool.bytes) == (len(model), sum(map(len, model)))
    while model:
        assert spool.pop() == model.popleft()
    assert spool.pop() is None and spool.bytes == 0
    spool.clear()


def test_drained_spool_gives_its_disk_space_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment=1 << 20)
    for _ in range(5):
        spool.push([os.urandom(600_000)])
    assert len(spool._segments) == 3          # rolled over twice
    for _ in range(5):
        assert spool.pop() is not None
    (seg,) = spool._segments
    assert os.fstat(seg.fd).st_size == 0
    assert list(tmp_path.iterdir()) == []     # segments are unlinked from the start
    assert spool.peak == 3_000_000


def test_spool_cap_and_bad_sizes(monkeypatch) -> None:
    spool = Spool(Path("/nonexistent-never-created"), max_bytes=100)
    assert spool.fits(100) and not spool.fits(101)
    monkeypatch.setenv("X2X_SPOOL_MAX", "512MiB")
    assert max_from_env() == 512 << 20
    monkeypatch.setenv("X2X_SPOOL_MAX", "0")
    assert max_from_env() == 0
    monkeypatch.setenv("X2X_SPOOL_MAX", "lots")
    with pytest.raises(BadInput, match="X2X_SPOOL_MAX.*'lots'"):
        max_from_env()
