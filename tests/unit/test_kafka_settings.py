"""Client settings: a follower waits long at Apache Kafka (which answers a fetch as soon as
a record arrives) and briefly at the embedded Tansu (which answers only when the wait ends)."""
from __future__ import annotations

import json

import pytest

from infra.kafka import FOLLOW_WAIT_MS, TANSU_FOLLOW_WAIT_MS, KafkaSettings


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("X2X_HOME", str(tmp_path))
    monkeypatch.delenv("X2X_BOOTSTRAP", raising=False)
    (tmp_path / "broker").mkdir()
    return tmp_path


def _embedded(home, engine: str | None, bootstrap: str = "127.0.0.1:19092") -> None:
    state = {"bootstrap": bootstrap, **({"engine": engine} if engine else {})}
    (home / "broker" / "broker.json").write_text(json.dumps(state))


@pytest.mark.parametrize("engine, wait", [("tansu", TANSU_FOLLOW_WAIT_MS),
                                          (None, TANSU_FOLLOW_WAIT_MS),   # before engines
                                          ("kafka", FOLLOW_WAIT_MS)])
def test_a_follower_waits_as_the_embedded_engine_answers(home, engine, wait) -> None:
    _embedded(home, engine)
    s = KafkaSettings.resolve()
    assert s.bootstrap == "127.0.0.1:19092"
    assert s.follower()["fetch.wait.max.ms"] == wait
    # Reads to a topic's end keep the short wait: their end is an empty fetch.
    assert s.consumer()["fetch.wait.max.ms"] == 50


def test_another_cluster_than_the_embedded_tansu_is_taken_for_kafka(home) -> None:
    _embedded(home, "tansu")
    assert KafkaSettings.resolve("kafka-1.example:9092").follower()["fetch.wait.max.ms"] \
        == FOLLOW_WAIT_MS
