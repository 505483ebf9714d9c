"""Seeding copies the history base sparse (infra/volume.copy_sparse): data where the base
has data, holes where it has holes or zeros, and old bytes of the destination gone."""
from __future__ import annotations

import os

from infra.volumes import copy_sparse

MiB = 1 << 20


def test_the_copy_equals_the_base_reads_only_its_data_and_stays_sparse(tmp_path) -> None:
    base, dst = tmp_path / "base.img", tmp_path / "dst.img"
    with open(base, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(1 * MiB)
        f.write(os.urandom(MiB))
        f.seek(9 * MiB)
        f.write(bytes(MiB))                   # allocated zeros: written as a hole
        f.seek(15 * MiB)
        f.write(b"end")
    with open(dst, "wb") as f:                # a replica re-seeded over old data
        f.write(os.urandom(16 * MiB))
    written = copy_sparse(str(base), str(dst), 16 * MiB)
    assert dst.read_bytes() == base.read_bytes()
    assert written <= 2 * MiB                 # the data, not the volume
    assert dst.stat().st_blocks * 512 <= 3 * MiB
