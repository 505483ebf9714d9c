"""An encrypted pair on a real broker: data unreadable on the topic, and every hostile
record refused with a message naming what is wrong, nothing applied."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from confluent_kafka import Producer

from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from infra import control
from infra.keys import key_for
from infra.reader import read_to_end
from infra.topics import journal_topic
from journal.batch import Sequencer
from journal.clock import now_ms
from journal.errors import CorruptEntry, ExtentOutOfRange, ReplayedEntry, SeqGap
from journal.ops import Op
from journal.pairs import PairSpec
from producers.scan import scan_once
from schemas import codec
from schemas.cipher import JournalKey, create_key
from tests.conftest import run_x2x, same_bytes

MiB = 1 << 20
MARK = b"PLAINTEXT-MARKER-" * 64


@pytest.fixture
def secure_pair(settings, pair_name, tmp_path):
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(MARK * 32)
    dst = tmp_path / "dst.img"
    key_file = tmp_path / "pair.key"
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(dst),
            "--create-target", "--key-file", str(key_file))
    return control.get_pair(settings, pair_name).spec, key_file


def _produce(settings, pair: str, *values: bytes) -> None:
    p = Producer(settings.producer())
    for v in values:
        p.produce(journal_topic(pair), v)
    assert p.flush(10) == 0


def test_encrypted_pair_replicates_and_hides_data(settings, secure_pair):
    spec, key_file = secure_pair
    assert spec.key_id and key_file.stat().st_mode & 0o777 == 0o600
    run_x2x("capture", spec.name, "--once", "--key-file", str(key_file))
    run_x2x("apply", spec.name, "--until-caught-up", "--key-file", str(key_file))
    assert same_bytes(spec.source, spec.target)
    raw = b"".join(m.value() for m in read_to_end(settings, journal_topic(spec.name)))
    assert b"PLAINTEXT-MARKER" not in raw and len(raw) > 64 * 1024
    # The key never shows in what x2x prints.
    shown = run_x2x("pair", "show", spec.name, "--json").stdout
    assert key_file.read_text().strip() not in shown and spec.key_id in shown


def test_apply_without_or_with_the_wrong_key(settings, secure_pair, tmp_path):
    spec, key_file = secure_pair
    run_x2x("capture", spec.name, "--once", "--key-file", str(key_file))
    proc = run_x2x("apply", spec.name, "--until-caught-up", check=False)
    assert proc.returncode == 2 and f"key id {spec.key_id}" in proc.stderr
    wrong = tmp_path / "wrong.key"
    create_key(wrong)
    proc = run_x2x("apply", spec.name, "--until-caught-up", "--key-file", str(wrong),
                   check=False)
    assert proc.returncode == 2 and "wrong key" in proc.stderr
    assert Path(spec.target).read_bytes() == bytes(4 * MiB)


def _hostile(settings, spec: PairSpec, key: JournalKey, bad, expect, match: str):
    """Apply what the capturer wrote, then one hostile record (bytes, or made from the next
    seq by ``bad``): refused with ``match``, nothing applied, checkpoint unmoved."""
    scan_once(spec, settings, key=key)
    Applier(spec, spec.target, settings, key=key).run(until_caught_up=True)
    before = Path(spec.target).read_bytes()
    cp = CheckpointStore(spec.name, spec.target).load()
    _produce(settings, spec.name, bad if isinstance(bad, bytes) else bad(cp.position.seq + 1))
    with pytest.raises(expect, match=match):
        Applier(spec, spec.target, settings, key=key).run(until_caught_up=True)
    assert Path(spec.target).read_bytes() == before
    assert CheckpointStore(spec.name, spec.target).load() == cp


def _next(spec: PairSpec, key: JournalKey, *ops: Op, seq: int, pair: str | None = None) -> bytes:
    """One entry of ``ops`` from seq ``seq``, encrypted and MACed with ``key``."""
    s = Sequencer(pair or spec.name, 1, next_seq=seq, key=key.mac_key)
    (entry,) = [e for op in ops for e in s.add(op, 1)]
    return codec.encode_entry(key.encrypt(entry))


def test_forged_entry_with_the_wrong_key(settings, secure_pair):
    spec, key_file = secure_pair
    key = key_for(spec, str(key_file))
    forged = lambda seq: _next(spec, JournalKey(bytes(32)), Op.write(0, b"EVIL" * 1024),
                               Op.flush(), seq=seq)
    _hostile(settings, spec, key, forged, CorruptEntry, "fails authentication")


def test_replayed_old_entry(settings, secure_pair):
    spec, key_file = secure_pair
    key = key_for(spec, str(key_file))
    scan_once(spec, settings, key=key)
    first = next(iter(read_to_end(settings, journal_topic(spec.name)))).value()
    _hostile(settings, spec, key, first, ReplayedEntry, "replayed an old entry")


def test_bit_flipped_payload(settings, secure_pair):
    spec, key_file = secure_pair
    key = key_for(spec, str(key_file))
    scan_once(spec, settings, key=key)
    good = next(iter(read_to_end(settings, journal_topic(spec.name)))).value()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    _hostile(settings, spec, key, bytes(flipped), CorruptEntry, "fails authentication|digest")


def test_truncated_record(settings, secure_pair):
    spec, key_file = secure_pair
    key = key_for(spec, str(key_file))
    scan_once(spec, settings, key=key)
    good = next(iter(read_to_end(settings, journal_topic(spec.name)))).value()
    _hostile(settings, spec, key, good[: len(good) // 3], CorruptEntry, "does not decode")


def test_record_from_another_pairs_topic(settings, secure_pair):
    spec, key_file = secure_pair
    key = key_for(spec, str(key_file))
    other = lambda seq: _next(spec, key, Op.write(0, b"X" * 4096), Op.flush(), seq=seq,
                              pair="another-pair")
    _hostile(settings, spec, key, other, CorruptEntry, "belongs to pair 'another-pair'")


def test_absurd_lengths(settings, secure_pair):
    spec, key_file = secure_pair
    key = key_for(spec, str(key_file))
    huge = lambda seq: _next(spec, key, Op.zero(0, 1 << 62), Op.flush(), seq=seq)
    _hostile(settings, spec, key, huge, ExtentOutOfRange, "outside the target")


def test_reordered_entry_is_a_gap(settings, secure_pair):
    spec, key_file = secure_pair
    key = key_for(spec, str(key_file))
    ahead = lambda seq: _next(spec, key, Op.write(0, b"Y" * 4096), Op.flush(), seq=seq + 40)
    _hostile(settings, spec, key, ahead, SeqGap, "jumps from seq")


def test_a_pair_created_again_never_inherits_the_old_key(settings, pair_name, tmp_path):
    """Deleting a pair retires its key on this host; the next --encrypt gets a new one,
    so records sealed with the old key do not pass as the new pair's."""
    from tests.conftest import make_image
    src = make_image(tmp_path / "s.img", 1 << 20, seed=8)
    args = ["pair", "create", pair_name, "--source", str(src), "--target",
            str(tmp_path / "t.img"), "--create-target", "--encrypt"]
    first = run_x2x(*args)
    deleted = run_x2x("pair", "delete", pair_name).stdout
    assert "its key was moved to" in deleted, deleted
    retired = list((Path(os.environ["X2X_HOME"]) / "keys" / "retired").glob(f"{pair_name}.*"))
    assert len(retired) == 1
    second = run_x2x(*args)
    old_id = re.search(r"key id (\S+)", first.stdout).group(1)
    new_id = re.search(r"key id (\S+)", second.stdout).group(1)
    assert old_id and new_id and old_id != new_id
    # A key left at the default path (the pair was deleted on another host) is not taken.
    run_x2x("pair", "delete", pair_name)
    retired[0].rename(Path(os.environ["X2X_HOME"]) / "keys" / f"{pair_name}.key")
    again = run_x2x(*args, check=False)
    assert again.returncode == 2 and "left by an earlier pair" in again.stderr, again.stderr
    assert "--key-file" in again.stderr


def _forge(settings, event: str, pair: str, spec: PairSpec | None = None,
           **attrs: str) -> None:
    """What whoever can write x2x.control can do: publish any event for a pair."""
    from dataclasses import asdict
    from infra.topics import CONTROL_TOPIC
    fields = {k: v for k, v in asdict(spec).items() if k not in ("name", "incarnation")} \
        if spec else None
    record = {"event": event, "pair": pair, "at_ms": now_ms(), "spec": fields,
              "attrs": attrs}
    p = Producer(settings.producer())
    errors: list[str] = []
    p.produce(CONTROL_TOPIC, codec.encode(codec.CONTROL, record), key=pair,
              on_delivery=lambda err, _m: err and errors.append(err.str()))
    assert p.flush(10) == 0 and not errors, errors


def _forge_created(settings, spec: PairSpec) -> None:
    _forge(settings, "created", spec.name, spec)


def test_a_forged_spec_cannot_redirect_the_applier_of_an_unkeyed_pair(
        settings, pair_name, tmp_path):
    """An unkeyed pair has no key to sign with: the services' pins protect it."""
    from tests.conftest import make_image
    src = make_image(tmp_path / "src.img", 2 << 20, seed=9)
    dst, elsewhere = tmp_path / "dst.img", tmp_path / "system-disk.img"
    elsewhere.write_bytes(b"precious" * 1024)
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(dst),
            "--create-target")
    run_x2x("capture", pair_name, "--once")
    run_x2x("apply", pair_name, "--until-caught-up")        # pins this host's view
    assert same_bytes(src, dst)
    spec = control.get_pair(settings, pair_name).spec
    before = elsewhere.read_bytes()
    # Another target: refused, nothing written anywhere.
    _forge_created(settings, PairSpec(pair_name, spec.source, str(elsewhere),
                                      spec.block_size, spec.volume_size))
    r = run_x2x("apply", pair_name, "--until-caught-up", check=False)
    assert r.returncode == 2 and "--accept-spec-change" in r.stderr, r.stderr
    assert str(elsewhere) in r.stderr and "Nothing was read or written" in r.stderr
    assert elsewhere.read_bytes() == before
    # Encryption on with a key nobody has: refused by the capturer and the applier alike.
    _forge_created(settings, PairSpec(pair_name, spec.source, spec.target,
                                      spec.block_size, spec.volume_size, "0123456789abcdef"))
    for cmd in (["apply", pair_name, "--until-caught-up"], ["capture", pair_name, "--once"]):
        r = run_x2x(*cmd, check=False)
        assert r.returncode == 2 and "key_id" in r.stderr, r.stderr
    # The operator restores the pair: services go on without any confirmation.
    _forge_created(settings, spec)
    run_x2x("apply", pair_name, "--until-caught-up")
    # A change made on purpose is confirmed on the host, once.
    moved = tmp_path / "moved.img"
    moved.write_bytes(dst.read_bytes())
    _forge_created(settings, PairSpec(pair_name, spec.source, str(moved), spec.block_size,
                                      spec.volume_size))
    run_x2x("apply", pair_name, "--until-caught-up", "--accept-spec-change")
    run_x2x("apply", pair_name, "--until-caught-up")
