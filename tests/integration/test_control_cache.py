"""The control topics fold from this host's cache on (infra/control_cache.py): a cached
fold equals a fresh one, new events are folded on top, a late event or a cache of other
topics makes the call fold everything again."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infra import control
from infra.paths import x2x_home
from journal.events import EpochAbandoned, FailoverRequested
from journal.pairs import PairSpec
from journal.roles import Role


@pytest.fixture
def own_home(tmp_path: Path):
    """A second X2X_HOME: the same broker seen from a host with no cache."""
    old = os.environ["X2X_HOME"]
    os.environ["X2X_HOME"] = str(tmp_path / "other-host")
    try:
        yield tmp_path / "other-host"
    finally:
        os.environ["X2X_HOME"] = old


def _cache_file() -> Path:
    files = list((x2x_home() / "cache").glob("control-*.json"))
    assert len(files) == 1, files
    return files[0]


def test_cached_fold_equals_a_fresh_one_and_follows_new_events(settings, pair_name,
                                                               own_home) -> None:
    spec = PairSpec(pair_name, "/src", "/dst", 65536, 1 << 20)
    control.create_pair(settings, spec)
    first = control.pairs(settings)                       # builds the cache
    doc = json.loads(_cache_file().read_text())
    assert pair_name in doc["pairs"] and all(v >= 0 for v in doc["offsets"].values())
    ev = EpochAbandoned(pair=pair_name, epoch=3, successor=4)
    control.publish(settings, ev, Role.CAPTURER)
    control.publish(settings, FailoverRequested(pair=pair_name, source="/src", forced=False))
    cached = control.pairs(settings)                      # from the cache on
    assert cached[pair_name].abandoned_epochs == frozenset({3})
    assert cached[pair_name].state == "failing-over"
    assert first[pair_name].state == "created"
    os.environ["X2X_HOME"] = str(own_home / "fresh")      # a host with no cache
    assert control.pairs(settings) == cached


def test_a_late_event_or_a_foreign_cache_folds_everything_again(settings, pair_name,
                                                                own_home) -> None:
    spec = PairSpec(pair_name, "/src", "/dst", 65536, 1 << 20)
    control.create_pair(settings, spec)
    control.pairs(settings)
    # Stamped before everything folded so far (a host whose clock is behind).
    control.publish(settings, EpochAbandoned(pair=pair_name, at_ms=1000, epoch=7, successor=8),
                    Role.CAPTURER)
    late = control.pairs(settings)
    os.environ["X2X_HOME"] = str(own_home / "fresh")
    assert control.pairs(settings) == late
    # A cache of other topics (another cluster, a recreated topic) is not used.
    path = _cache_file()
    doc = json.loads(path.read_text())
    doc["identity"] = "another-cluster|a|b|c"
    doc["pairs"] = {}
    path.write_text(json.dumps(doc))
    assert control.pairs(settings) == late
    # A damaged cache neither: it is folded afresh and replaced.
    path.write_text("{not json")
    assert control.pairs(settings) == late
    assert json.loads(path.read_text())["identity"] != "another-cluster|a|b|c"
