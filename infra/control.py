"""The control topic: pair specs and lifecycle events, published and folded."""
from __future__ import annotations

import time
from dataclasses import asdict

from confluent_kafka import Producer

from infra.kafka import KafkaSettings
from infra.reader import read_to_end
from infra.topics import CONTROL_TOPIC, ensure_base_topics
from journal.errors import BrokerError, PairNotFound
from journal.pairs import ControlEvent, PairSpec, PairState, fold
from schemas import codec


def now_ms() -> int:
    return int(time.time() * 1000)


def publish(settings: KafkaSettings, event: ControlEvent, timeout: float = 15.0) -> None:
    """Append ``event`` to the control topic and wait until the broker has it."""
    ensure_base_topics(settings.check_reachable())
    record = {"event": event.event, "pair": event.pair, "at_ms": event.at_ms,
              "spec": asdict(event.spec) if event.spec else None, "attrs": event.attrs}
    errors: list[str] = []
    producer = Producer(settings.side_producer())
    producer.produce(CONTROL_TOPIC, codec.encode(codec.CONTROL, record), key=event.pair,
                     on_delivery=lambda err, _m: err and errors.append(err.str()))
    if producer.flush(timeout) or errors:
        raise BrokerError(f"control event {event.event} for pair {event.pair} was not "
                          f"acknowledged by {settings.bootstrap}: {errors or 'timeout'}")


def events(settings: KafkaSettings) -> list[ControlEvent]:
    ensure_base_topics(settings.check_reachable())
    out = []
    for msg in read_to_end(settings, CONTROL_TOPIC):
        r = codec.decode(msg.value(), codec.CONTROL)
        spec = r["spec"]
        out.append(ControlEvent(r["event"], r["pair"], r["at_ms"],
                                PairSpec(name=r["pair"], **{k: v for k, v in spec.items()})
                                if spec else None, r["attrs"]))
    return out


def pairs(settings: KafkaSettings) -> dict[str, PairState]:
    """Every current pair, folded from the control topic."""
    return fold(events(settings))


def get_pair(settings: KafkaSettings, name: str) -> PairState:
    found = pairs(settings)
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise PairNotFound(f"no pair named {name!r} (known pairs: {known}); "
                           f"create it with 'x2x pair create {name} --source ... --target ...'")
    return found[name]


def create_pair(settings: KafkaSettings, spec: PairSpec) -> None:
    """Publish a pair and create its journal topic; refuses an existing name."""
    from infra.topics import JOURNAL_CONFIG, ensure_topic, journal_topic
    from journal.errors import PairExists
    admin = settings.check_reachable()
    ensure_base_topics(admin)
    existing = pairs(settings)
    if spec.name in existing:
        s = existing[spec.name].spec
        raise PairExists(f"pair {spec.name!r} exists already ({s.source} -> {s.target}); "
                         f"delete it first with 'x2x pair delete {spec.name}'")
    ensure_topic(admin, journal_topic(spec.name), JOURNAL_CONFIG)
    publish(settings, ControlEvent("created", spec.name, now_ms(), spec))


def delete_pair(settings: KafkaSettings, name: str) -> PairState:
    """Delete a pair and its journal; targets and their data are left as they are."""
    from infra.topics import delete_topic, journal_topic
    state = get_pair(settings, name)
    publish(settings, ControlEvent("deleted", name, now_ms()))
    delete_topic(settings.check_reachable(), journal_topic(name))
    return state
