"""Least privilege on a real Apache Kafka with SASL/SCRAM and KRaft's StandardAuthorizer.

One broker for the module, started with ``x2x broker up --auth scram`` in its own
X2X_HOME. Principals are made with ``x2x access grant`` for the three roles; each role
does its job through the real CLI, and every step outside its job is refused by the
broker (or, for a record on a topic the role may write, ignored by every reader).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra.kafka import load_properties
from infra.topics import JOURNAL_CONFIG, control_topic, journal_topic
from journal.roles import Role
from schemas import codec
from tests.conftest import free_port, make_image, run_x2x, same_bytes, x2x_bin

pytestmark = pytest.mark.timeout(300)


class Secured:
    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("X2X_BOOTSTRAP", "X2X_KAFKA_CONFIG")}
        self.env.update(X2X_HOME=str(home), X2X_BOOTSTRAP=f"127.0.0.1:{self.port}")
        self.configs: dict[str, Path] = {}

    def x2x(self, *args: str, as_: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if as_ is not None:
            env["X2X_KAFKA_CONFIG"] = str(self.configs[as_])
        return run_x2x(*args, env=env, check=check, timeout=120)

    def props(self, who: str) -> dict[str, str]:
        return load_properties(str(self.configs[who]))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    b = Secured(tmp_path_factory.mktemp("acl-home"))
    out = b.x2x("broker", "up", "--port", str(b.port), "--auth", "scram").stdout
    try:
        admin_props = b.home / "broker" / "kafka" / "admin.properties"
        assert str(admin_props) in out, out
        assert oct(admin_props.stat().st_mode & 0o777) == "0o600"
        b.configs["admin"] = admin_props
        for role, user, pair in (("operator", "ops", None), ("capturer", "cap-web", "web"),
                                 ("applier", "app-web", "web")):
            path = b.home / f"{user}.properties"
            args = ["access", "grant", role, user, "--out", str(path)]
            b.x2x(*args, *(["--pair", pair] if pair else []), as_="admin")
            assert oct(path.stat().st_mode & 0o777) == "0o600"
            b.configs[user] = path
        yield b
    finally:
        b.x2x("broker", "down", check=False)


def _produce(props: dict[str, str], topic: str, value: bytes) -> str | None:
    """Produce one record; the delivery error's name, or None if it was acknowledged."""
    errors: list[str] = []
    p = Producer({**props, "message.timeout.ms": 10_000})
    p.produce(topic, value, on_delivery=lambda err, _m: err and errors.append(err.name()))
    left = p.flush(15)
    return errors[0] if errors else ("timeout" if left else None)


def test_each_role_does_its_job_through_the_cli(secured: Secured, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 4 << 20, seed=5, data_fraction=0.5)
    dst = tmp_path / "dst.img"
    secured.x2x("pair", "create", "web", "--source", str(src), "--target", str(dst),
                "--create-target", as_="ops")
    secured.x2x("capture", "web", "--once", as_="cap-web")
    secured.x2x("apply", "web", "--until-caught-up", as_="app-web")
    assert same_bytes(src, dst)
    shown = json.loads(secured.x2x("status", "web", "--json", as_="ops").stdout)
    assert shown and shown[0]["pair"] == "web", shown


def test_no_credentials_no_access(secured: Secured) -> None:
    proc = secured.x2x("pair", "list", check=False)
    assert proc.returncode != 0, proc.stdout


def test_an_applier_cannot_write_a_journal(secured: Secured) -> None:
    err = _produce(secured.props("app-web"), journal_topic("web"), b"forged")
    assert err == "TOPIC_AUTHORIZATION_FAILED", err


def test_a_capturer_cannot_write_another_pairs_journal_or_create_topics(
        secured: Secured) -> None:
    err = _produce(secured.props("cap-web"), journal_topic("other"), b"forged")
    assert err in ("TOPIC_AUTHORIZATION_FAILED", "UNKNOWN_TOPIC_OR_PART"), err
    admin = AdminClient(secured.props("cap-web"))
    fut = admin.create_topics([NewTopic(journal_topic("other"), 1, 1,
                                        config=JOURNAL_CONFIG)])[journal_topic("other")]
    with pytest.raises(Exception, match="(?i)authori"):
        fut.result(15)


def test_a_capturer_cannot_promote_a_pair(secured: Secured, tmp_path: Path) -> None:
    src = make_image(tmp_path / "s.img", 1 << 20, seed=6)
    secured.x2x("pair", "create", "web2", "--source", str(src), "--target",
                str(tmp_path / "t.img"), "--create-target", as_="ops")
    promoted = codec.encode(codec.CONTROL, {
        "event": "promoted", "pair": "web2", "at_ms": 1 << 41, "spec": None,
        "attrs": {"epoch": "9", "forced": "1"}})
    # The operators' control topic refuses the capturer's principal outright ...
    err = _produce(secured.props("cap-web"), control_topic(Role.OPERATOR), promoted)
    assert err == "TOPIC_AUTHORIZATION_FAILED", err
    # ... and on its own topic, which it may write, a promotion counts for nothing.
    assert _produce(secured.props("cap-web"), control_topic(Role.CAPTURER), promoted) is None
    shown = json.loads(secured.x2x("pair", "show", "web2", "--json", as_="ops").stdout)
    assert shown["state"] == "created" and not shown["reversed"], shown


def test_the_history_base_runs_as_an_operator_and_an_applier_cannot_delete_records(
        secured: Secured, tmp_path: Path) -> None:
    from confluent_kafka import TopicPartition
    src = make_image(tmp_path / "src.img", 4 << 20, seed=6, data_fraction=1.0)
    secured.x2x("pair", "create", "hist", "--source", str(src), "--target",
                str(tmp_path / "dst.img"), "--create-target", "--history", "1s", as_="ops")
    for role, user in (("capturer", "cap-hist"), ("applier", "app-hist")):
        path = secured.home / f"{user}.properties"
        secured.x2x("access", "grant", role, user, "--pair", "hist", "--out", str(path),
                    as_="admin")
        secured.configs[user] = path
    # Records with capture times two seconds apart, so the first leave the window.
    for _ in range(2):
        secured.x2x("capture", "hist", "--once", "--rebaseline", as_="cap-hist")
        time.sleep(2)
    tp = TopicPartition(journal_topic("hist"), 0, 1)
    app = AdminClient(secured.props("app-hist"))    # may read the journal, not trim it
    with pytest.raises(Exception, match="(?i)authori"):
        app.delete_records([tp])[tp].result(15)
    proc = subprocess.Popen(
        [x2x_bin(), "base", "hist", "--volume",
         str(tmp_path / "base.img"), "--interval", "0.5"],
        env={**secured.env, "X2X_KAFKA_CONFIG": str(secured.configs["ops"])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            st = json.loads(secured.x2x("status", "hist", "--json", as_="ops").stdout)[0]
            if st.get("history") and st["history"]["low"] > 0:
                break
            assert time.monotonic() < deadline and proc.poll() is None, \
                (st, proc.poll() is None or proc.communicate())
            time.sleep(1)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
