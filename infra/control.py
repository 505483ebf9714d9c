"""The control topics: pair specs and lifecycle events, published and folded.

Each role publishes to its own control topic (journal/roles.py says why); readers merge
the topics and keep only events the topic's role may publish.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import asdict

from confluent_kafka import Message, Producer

from infra.kafka import KafkaSettings
from infra.reader import read_to_end
from infra.topics import CONTROL_TOPICS, control_topic, ensure_base_topics
from journal.errors import BrokerError, PairNotFound, X2XError
from journal.pairs import ControlEvent, PairSpec, PairState, fold
from journal.roles import Role, may_publish
from schemas import codec

log = logging.getLogger("x2x.control")
#: Which role writes each control topic.
ROLE_OF_TOPIC = {control_topic(r): r for r in Role}


def now_ms() -> int:
    return int(time.time() * 1000)


def publish(settings: KafkaSettings, event: ControlEvent, role: Role = Role.OPERATOR,
            timeout: float = 15.0) -> None:
    """Append ``event`` to ``role``'s control topic and wait until the broker has it."""
    if not may_publish(role, event.event):
        raise X2XError(f"a {role.value} may not publish {event.event!r} (journal/roles.py)")
    ensure_base_topics(settings.check_reachable())
    record = {"event": event.event, "pair": event.pair, "at_ms": event.at_ms,
              "spec": asdict(event.spec) if event.spec else None, "attrs": event.attrs}
    errors: list[str] = []
    producer = Producer(settings.side_producer())
    producer.produce(control_topic(role), codec.encode(codec.CONTROL, record),
                     key=event.pair,
                     on_delivery=lambda err, _m: err and errors.append(err.str()))
    if producer.flush(timeout) or errors:
        raise BrokerError(f"control event {event.event} for pair {event.pair} was not "
                          f"acknowledged by {settings.bootstrap}: {errors or 'timeout'}")


def decode_event(value: bytes) -> ControlEvent:
    r = codec.decode(value, codec.CONTROL)
    spec = r["spec"]
    return ControlEvent(r["event"], r["pair"], r["at_ms"],
                        PairSpec(name=r["pair"], **spec) if spec else None, r["attrs"])


def accepted(msg: Message) -> ControlEvent | None:
    """The event in ``msg`` if it decodes and its topic's role may publish it; else
    None, with the reason logged (a foreign or forged record never stops a reader)."""
    try:
        ev = decode_event(msg.value())
    except X2XError as e:
        log.warning("skipping %s offset %d: %s", msg.topic(), msg.offset(), e)
        return None
    role = ROLE_OF_TOPIC.get(msg.topic(), Role.OPERATOR)
    if not may_publish(role, ev.event):
        log.warning("ignoring %r for pair %s on %s offset %d: a %s may not publish it",
                    ev.event, ev.pair, msg.topic(), msg.offset(), role.value)
        return None
    return ev


def _topic_events(settings: KafkaSettings, topic: str) -> list[ControlEvent]:
    return [ev for msg in read_to_end(settings, topic) if (ev := accepted(msg)) is not None]


def events(settings: KafkaSettings) -> list[ControlEvent]:
    """Every accepted control event, the topics merged by time (each in its own order)."""
    ensure_base_topics(settings.check_reachable())
    per_topic = [_topic_events(settings, t) for t in CONTROL_TOPICS]
    return list(heapq.merge(*per_topic, key=lambda ev: ev.at_ms))


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
