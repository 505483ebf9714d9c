"""A keyed pair's control events and heartbeats are signed with its key: what whoever can
write x2x.control or x2x.status forges is ignored, and nothing is applied, redirected,
flipped, skipped or blocked (issue 14). Real broker, real CLI."""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from confluent_kafka import Producer

from consumers.failover import signed_beats
from infra import control, keys
from infra.heartbeat import beat_key
from infra.reader import read_to_end
from infra.topics import CONTROL_TOPICS, STATUS_TOPIC, journal_topic
from journal.clock import now_ms
from journal.pairs import JOURNAL_LOST, PairSpec
from journal.status import Beat, newest
from schemas import codec
from tests.conftest import make_image, run_x2x, same_bytes
from tests.integration.test_security import _forge

MiB = 1 << 20


def _fresh_fold(settings):
    """The pairs folded from the topics' start (no cached fold of this host)."""
    shutil.rmtree(Path(os.environ["X2X_HOME"]) / "cache", ignore_errors=True)
    return control.pairs(settings)


def _produce(settings, topic: str, key: str, value: bytes) -> None:
    p = Producer(settings.producer())
    p.produce(topic, value, key=key)
    assert p.flush(10) == 0


def _is(value: bytes, pair: str, event: str) -> bool:
    r = codec.decode(value, codec.CONTROL)
    return r["pair"] == pair and r["event"] == event


def _mac(value: bytes) -> bytes:
    return codec.decode(value, codec.CONTROL)["mac"]


def _keyed_pair(settings, name: str, tmp_path: Path, key_file: Path | None = None):
    """A keyed pair, its key at the default path or ``key_file``, captured once."""
    src = make_image(tmp_path / "src.img", 2 * MiB, seed=4)
    dst = tmp_path / "dst.img"
    key = ("--key-file", str(key_file)) if key_file else ()
    run_x2x("pair", "create", name, "--source", str(src), "--target", str(dst),
            "--create-target", *(key or ("--encrypt",)))
    run_x2x("capture", name, "--once", *key)
    return control.get_pair(settings, name)


def test_forged_control_events_of_a_keyed_pair_change_nothing(settings, pair_name, tmp_path):
    st = _keyed_pair(settings, pair_name, tmp_path)
    spec = st.spec
    assert spec.key_id and spec.incarnation == st.created_at_ms
    elsewhere = tmp_path / "system-disk.img"
    elsewhere.write_bytes(b"precious" * 4096)
    before = elsewhere.read_bytes()
    # Each attack of the issue, produced straight to the operator's control topic.
    _forge(settings, "created", pair_name, replace(spec, target=str(elsewhere)))
    _forge(settings, "created", pair_name, replace(spec, key_id=""))
    _forge(settings, "failover-requested", pair_name, source=spec.source, forced="1")
    _forge(settings, "promoted", pair_name, volume=spec.target, epoch="99", seq="1")
    _forge(settings, "epoch-abandoned", pair_name, epoch="1")
    _forge(settings, "resync-needed", pair_name, cause=JOURNAL_LOST, reason="forged")
    for folded in (control.pairs(settings), _fresh_fold(settings)):  # cached and fresh
        now = folded[pair_name]
        assert now == st, (now, st)
    # The services see the pair as it is: the applier writes the right target, keyed.
    run_x2x("apply", pair_name, "--until-caught-up")
    assert same_bytes(spec.source, spec.target) and elsewhere.read_bytes() == before
    # A forged delete does not drop the pair either.
    _forge(settings, "deleted", pair_name)
    assert pair_name in _fresh_fold(settings)
    # A genuine event, produced again by whoever reads the topic, counts once.
    run_x2x("pair", "failover", pair_name, "--force")
    promoted = _fresh_fold(settings)[pair_name]
    assert promoted.state == "promoted" and promoted.reversed
    genuine = [m.value() for t in CONTROL_TOPICS for m in read_to_end(settings, t)
               if _is(m.value(), pair_name, "promoted") and _mac(m.value())]
    assert len(genuine) == 1
    _produce(settings, CONTROL_TOPICS[0], pair_name, genuine[0])
    assert _fresh_fold(settings)[pair_name].reversed     # not flipped back


def test_an_operator_without_the_key_cannot_sign(settings, pair_name, tmp_path):
    """Publishing for a keyed pair needs its key: refused by name, nothing published."""
    _keyed_pair(settings, pair_name, tmp_path)
    keyfile = Path(os.environ["X2X_HOME"]) / "keys" / f"{pair_name}.key"
    hidden = keyfile.rename(tmp_path / "elsewhere.key")
    try:
        r = run_x2x("pair", "delete", pair_name, check=False)
        assert r.returncode == 2 and "signed with its key" in r.stderr, r.stderr
        assert "--key-file" in r.stderr
        assert pair_name in _fresh_fold(settings)
    finally:
        hidden.rename(keyfile)


def test_a_forged_heartbeat_does_not_set_the_forced_failover_goal(
        settings, pair_name, tmp_path):
    st = _keyed_pair(settings, pair_name, tmp_path)
    spec = st.spec
    run_x2x("apply", pair_name, "--until-caught-up")
    genuine = newest(signed_beats(settings, pair_name), pair_name, "capturer", spec.source)
    assert genuine is not None and genuine.seq > 0
    forged = Beat(pair_name, "capturer", spec.source, "evil", 1, now_ms(), "capturing",
                  genuine.epoch, genuine.seq + 10**6, 0, now_ms())
    _produce(settings, STATUS_TOPIC, beat_key(pair_name, "capturer", spec.source),
             codec.encode(codec.HEARTBEAT, asdict(forged)))
    seen = newest(signed_beats(settings, pair_name), pair_name, "capturer", spec.source)
    assert seen is not None and seen.seq == genuine.seq and seen.host != "evil"
    out = run_x2x("pair", "failover", pair_name, "--force").stdout
    assert "0 ops lost" in out, out


def test_a_pair_created_again_with_the_same_key_refuses_the_old_journal_and_events(
        settings, pair_name, tmp_path):
    """Same name, same key (--key-file on purpose): the incarnation in every MAC and in
    the AES-GCM associated data keeps the old pair's records out."""
    key_file = tmp_path / "pair.key"
    first = _keyed_pair(settings, pair_name, tmp_path, key_file)
    keys.remember_file(str(key_file))    # this test's reads check with it, as a service's
    old_journal = [m.value() for m in read_to_end(settings, journal_topic(pair_name))]
    old_events = [m.value() for t in CONTROL_TOPICS for m in read_to_end(settings, t)
                  if codec.decode(m.value(), codec.CONTROL)["pair"] == pair_name]
    assert old_journal and old_events
    run_x2x("pair", "delete", pair_name, "--key-file", str(key_file))
    dst2 = tmp_path / "dst2.img"
    run_x2x("pair", "create", pair_name, "--source", first.spec.source, "--target", str(dst2),
            "--create-target", "--key-file", str(key_file))
    second = control.get_pair(settings, pair_name)
    assert second.spec.key_id == first.spec.key_id
    assert second.spec.incarnation != first.spec.incarnation
    # The old pair's genuine events, produced again: not the new pair's.
    for value in old_events:
        _produce(settings, CONTROL_TOPICS[0], pair_name, value)
    assert _fresh_fold(settings)[pair_name] == second
    # Its genuine journal records, produced into the new topic: refused, nothing applied.
    for value in old_journal:
        _produce(settings, journal_topic(pair_name), pair_name, value)
    r = run_x2x("apply", pair_name, "--until-caught-up", "--key-file", str(key_file),
                check=False)
    assert r.returncode != 0 and "fails authentication" in r.stderr, r.stderr
    assert dst2.read_bytes() == bytes(dst2.stat().st_size)


def test_unsigned_events_of_an_unkeyed_pair_still_fold(settings, pair_name):
    """Nothing to sign with: the fold takes them (pins and ACLs protect such a pair)."""
    spec = PairSpec(pair_name, "/s", "/t", 65536, MiB)
    _forge(settings, "created", pair_name, spec)
    _forge(settings, "failover-requested", pair_name, source="/s", forced="1")
    assert _fresh_fold(settings)[pair_name].state == "failing-over"
