"""The control topics: pair specs and lifecycle events, published and folded.

Each role publishes to its own control topic (journal/roles.py says why); readers merge
the topics and keep only events the topic's role may publish. A keyed pair's events are
signed with the pair's key and a reader that holds the key folds only those that verify
(journal/pairs.signer says which key must have signed an event; docs/security.md).
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Iterable

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from infra import control_cache, keys
from infra.kafka import KafkaSettings
from infra.reader import read_many, read_up_to_end
from infra.topics import CONTROL_TOPICS, control_topic, ensure_base_topics
from journal.errors import BadInput, BrokerError, PairNotFound, X2XError
from journal.events import (AutoFailoverSet, Created, Deleted, Event, GroupSet, HistorySet,
                            RateSet)
from journal.fencing import AutoFailover
from journal.history import HistorySettings
from journal.pairs import PairSpec, PairState, fold, signer
from journal.roles import Role, may_publish
from schemas import codec
from schemas.control import decode_event, encode_event

log = logging.getLogger("x2x.control")
#: Which role writes each control topic.
ROLE_OF_TOPIC = {control_topic(r): r for r in Role}



#: One producer per cluster and credentials for the life of the process, made after the
#: control topics were found or created: a service publishing an event now and then
#: must not open a new connection (and ask for the topics) each time.
_producers: dict[tuple[str, tuple[tuple[str, str], ...]], Producer] = {}
_producers_lock = threading.Lock()


def _producer(settings: KafkaSettings) -> Producer:
    key = (settings.bootstrap, tuple(sorted(settings.extra.items())))
    with _producers_lock:
        producer = _producers.get(key)
        if producer is None:
            ensure_base_topics(settings.check_reachable())
            producer = _producers[key] = Producer(settings.side_producer())
        return producer


def publish(settings: KafkaSettings, event: Event, role: Role = Role.OPERATOR,
            timeout: float = 15.0) -> None:
    """Append ``event`` to ``role``'s control topic and wait until the broker has it."""
    if not may_publish(role, type(event)):
        raise X2XError(f"a {role.value} may not publish {event.NAME!r} (journal/roles.py)")
    data = encode_event(event)
    spec = signer(pairs(settings), event)
    if spec is not None:
        key = keys.lookup(spec)
        if key is None:
            raise BadInput(
                f"pair {event.pair} is encrypted: its control events are signed with its key "
                f"(id {spec.key_id}), which this host does not have; pass --key-file or copy "
                f"the key to {keys.default_key_path(event.pair)}. Nothing was published")
        data = codec.sign(codec.CONTROL, data, key.control_mac)
    errors: list[str] = []
    producer = _producer(settings)
    producer.produce(control_topic(role), data, key=event.pair,
                     on_delivery=lambda err, _m: err and errors.append(err.str()))
    if producer.flush(timeout) or errors:
        raise BrokerError(f"control event {event.NAME} for pair {event.pair} was not "
                          f"acknowledged by {settings.bootstrap}: {errors or 'timeout'}")


def accepted(msg: Message) -> Event | None:
    """The event in ``msg`` if it decodes, is of a kind this x2x knows and its topic's
    role may publish it; else None, with the reason logged (a foreign, forged or newer
    record never stops a reader)."""
    try:
        ev = decode_event(msg.value())
    except X2XError as e:
        log.warning("skipping %s offset %d: %s", msg.topic(), msg.offset(), e)
        return None
    if ev is None:
        log.debug("skipping %s offset %d: a kind of event this x2x does not know",
                  msg.topic(), msg.offset())
        return None
    role = ROLE_OF_TOPIC.get(msg.topic(), Role.OPERATOR)
    if not may_publish(role, type(ev)):
        log.warning("ignoring %r for pair %s on %s offset %d: a %s may not publish it",
                    ev.NAME, ev.pair, msg.topic(), msg.offset(), role.value)
        return None
    return ev


def trusted(folded: dict[str, PairState], ev: Event, data: bytes,
            where: str) -> tuple[bool | None, bytes]:
    """May ``ev`` (encoded as ``data``) be folded into ``folded``? True: it needs no
    signature or carries the right one; False: it needs one and does not (logged); None:
    it needs one and the key is not on this host, so it cannot be checked here. Also the
    MAC it carries (empty for an unkeyed pair)."""
    spec = signer(folded, ev)
    if spec is None:
        return True, b""
    key = keys.lookup(spec)
    if key is None:
        return None, b""
    mac = codec.verified_mac(codec.CONTROL, data, key.control_mac)
    if mac is not None:
        return True, mac
    log.warning("ignoring %r for pair %s at %s: it is not signed with the pair's key (forged, "
                "altered, or left by an earlier pair of this name)", ev.NAME, ev.pair, where)
    return False, b""


def fold_trusted(events: list[tuple[Event, bytes, str]],
                 start: dict[str, PairState] | None = None
                 ) -> tuple[dict[str, PairState], set[str]]:
    """Fold the events ``trusted`` admits, in order; also the key ids of the pairs whose
    signed events could not be checked here (taken as they are: this host can only show
    them). A signed event seen twice (a genuine record produced again) counts once."""
    folded, unchecked, seen = dict(start or {}), set(), set()
    for ev, data, where in events:
        verdict, mac = trusted(folded, ev, data, where)
        if verdict is False or (mac and mac in seen):
            continue
        seen.add(mac)
        if verdict is None:
            unchecked.add(signer(folded, ev).key_id)
        folded = fold((ev,), folded)
    return folded, unchecked


def _checkable_now(cached: control_cache.Folded) -> bool:
    """Is a key whose pair's events the cached fold could not check here now?"""
    return any(p.spec.key_id in cached.unchecked and keys.lookup(p.spec)
               for p in cached.pairs.values())


#: Events are folded in this order: by time, then by topic (operator, capturer, applier),
#: each topic keeping its own order; a cached fold and a fresh one are then the same.
Key = tuple[int, int]
_RANK = {t: i for i, t in enumerate(CONTROL_TOPICS)}


Read = tuple[Key, tuple[Event, bytes, str]]


def _read(settings: KafkaSettings, starts: dict[str, int]
          ) -> tuple[list[Read], dict[str, int]]:
    """Accepted events from ``starts`` on, in fold order, each with its record and where it
    is, and every topic's next offset."""
    return _in_fold_order(read_many(settings, starts), starts)


def _in_fold_order(records: Iterable[tuple[str, Message]], starts: dict[str, int]
                   ) -> tuple[list[Read], dict[str, int]]:
    """The accepted events of ``records`` (read from ``starts`` on) in fold order, and
    every topic's next offset."""
    per_topic: dict[str, list[Read]] = {t: [] for t in starts}
    nxt = dict(starts)
    for topic, msg in records:
        nxt[topic] = msg.offset() + 1
        ev = accepted(msg)
        if ev is not None:
            per_topic[topic].append(((ev.at_ms, _RANK.get(topic, 0)),
                                     (ev, msg.value(), f"{topic} offset {msg.offset()}")))
    return list(heapq.merge(*per_topic.values(), key=lambda ke: ke[0])), nxt


def pairs(settings: KafkaSettings) -> dict[str, PairState]:
    """Every current pair, folded from the control topics: from this host's cached fold
    on, reading only the events published since (infra/control_cache.py)."""
    return folded(settings).pairs


def _identity(admin: AdminClient, timeout: float = 10.0) -> str | None:
    """The cluster's and the control topics' ids (control_cache.identity)."""
    return control_cache.identity(admin, admin.list_topics(timeout=timeout).cluster_id,
                                  CONTROL_TOPICS)


def folded(settings: KafkaSettings) -> control_cache.Folded:
    """The fold :func:`pairs` gives, with the offsets it reaches (its identity is empty
    where the broker tells no topic ids: then nothing is cached)."""
    admin = settings.check_reachable()
    ensure_base_topics(admin)
    ident = _identity(admin)
    cached = control_cache.load(settings.bootstrap, ident) if ident else None
    if cached is not None and _checkable_now(cached):
        log.info("a pair's key is here now: folding its events again, checked")
        cached = None
    if cached is not None:
        new, offsets = _read(settings, cached.offsets)
        later = _folded_on(cached, new, offsets)
        if later is not None:
            if new:
                control_cache.save(settings.bootstrap, later)
            return later
        log.info("a control event older than the cached fold arrived: folding again")
    every, offsets = _read(settings, {t: 0 for t in CONTROL_TOPICS})
    states, unchecked = fold_trusted([e for _, e in every])
    fold_all = control_cache.Folded(ident or "", offsets, every[-1][0] if every else (0, 0),
                                    states, frozenset(unchecked))
    if ident:
        control_cache.save(settings.bootstrap, fold_all)
    return fold_all


def _folded_on(base: control_cache.Folded, new: list[Read], offsets: dict[str, int]
               ) -> control_cache.Folded | None:
    """``base`` with ``new`` folded on, or None if one of them is older than the newest
    event in ``base`` (then only a fold from the start gives the same pairs)."""
    if any(k < base.last_key for k, _ in new):
        return None
    if not new:
        return base
    states, unchecked = fold_trusted([e for _, e in new], base.pairs)
    return control_cache.Folded(base.identity, offsets, new[-1][0], states,
                                base.unchecked | frozenset(unchecked))


def _pick(found: dict[str, PairState], name: str) -> PairState:
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise PairNotFound(f"no pair named {name!r} (known pairs: {known}); "
                           f"create it with 'x2x pair create {name} --source ... --target ...'")
    return found[name]


def get_pair(settings: KafkaSettings, name: str) -> PairState:
    return _pick(pairs(settings), name)


#: Seconds between two checks by a :class:`PairsTail` that the control topics are still
#: the ones it read.
TOPICS_CHECK_S = 5.0


class PairsTail:
    """The pairs' state for a service that asks again and again (a watcher, twice a
    second): :func:`folded` once, then brought up to date from one follower consumer,
    instead of an admin client, a topic description and a new consumer at every call.
    Between two calls it may lag the topics by the follower's fetch; a caller that must
    know the broker answers now checks that itself (consumers/watch.py does).

    A broker that lost its data (Tansu in memory, restarted), or control topics deleted
    and created again, start the topics anew: the pairs folded from the old ones are
    gone, and the tail folds again from the new. It notices by the topics' ids (asked
    every TOPICS_CHECK_S, where the broker tells them) or by a record below the
    position it had read to (a consumer reset to the start)."""

    def __init__(self, settings: KafkaSettings, timeout: float = 15.0) -> None:
        self.settings, self.timeout = settings, timeout
        self._consumer = Consumer(settings.follower())
        self._admin: AdminClient | None = None
        self._fold: control_cache.Folded | None = None
        self._checked = time.monotonic()

    def get(self, name: str) -> PairState:
        """The pair ``name`` now (PairNotFound as :func:`get_pair`)."""
        return _pick(self.pairs(), name)

    def pairs(self) -> dict[str, PairState]:
        if self._fold is None or _checkable_now(self._fold) or self._topics_anew():
            self._fold = folded(self.settings)
            # Current as read by folded(); from there on each call takes what arrived.
            self._consumer.assign([TopicPartition(t, 0, self._fold.offsets.get(t, 0))
                                   for t in CONTROL_TOPICS])
        starts = {t: self._fold.offsets.get(t, 0) for t in CONTROL_TOPICS}
        records = list(read_up_to_end(self._consumer, set(), self.settings.bootstrap,
                                      self.timeout, patient=True))
        below = next((f"{t} offset {m.offset()}, below {starts[t]}" for t, m in records
                      if m.offset() < starts[t]), None)
        if below is not None:
            self._anew(f"the consumer read {below}")
            self._fold = None
            return self.pairs()
        new, offsets = _in_fold_order(records, starts)
        later = _folded_on(self._fold, new, offsets)
        if later is None:
            log.info("a control event older than the folded ones arrived: folding again")
            self._fold = None
            return self.pairs()
        self._fold = later
        return later.pairs

    def _topics_anew(self) -> bool:
        """Are the control topics others than those the fold was read from (ids asked at
        most every TOPICS_CHECK_S; never where the broker tells none)?"""
        assert self._fold is not None
        now = time.monotonic()
        if not self._fold.identity or now - self._checked < TOPICS_CHECK_S:
            return False
        self._checked = now
        self._admin = self._admin or AdminClient(self.settings.admin())
        try:
            # Briefly: in an outage the read that follows waits, and says what is wrong.
            ident = _identity(self._admin, 3.0)
        except KafkaException:
            return False
        if ident is None or ident == self._fold.identity:
            return False
        self._anew("their ids changed")
        return True

    def _anew(self, sign: str) -> None:
        log.warning("the control topics at %s started anew (%s): the broker lost its data "
                    "or they were created again; the pairs are read afresh from them",
                    self.settings.bootstrap, sign)

    def close(self) -> None:
        self._consumer.close()


def create_pair(settings: KafkaSettings, spec: PairSpec,
                history: HistorySettings = HistorySettings()) -> None:
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
    publish(settings, Created(pair=spec.name, spec=spec))
    if history.bounded:
        set_history(settings, spec.name, history)


def set_history(settings: KafkaSettings, name: str, history: HistorySettings) -> PairState:
    """Set or change a pair's history window: the journal's segment size first (so the
    disk follows deletions from the start), then the event the history base obeys."""
    from infra.retention import set_segment_bytes
    state = get_pair(settings, name)
    set_segment_bytes(settings, name, history.segment_bytes)
    publish(settings, HistorySet(pair=name, window_ms=history.window_ms,
                                 journal_max=history.journal_max))
    return state


def set_auto_failover(settings: KafkaSettings, name: str,
                      auto: AutoFailover | None) -> PairState:
    """Turn a pair's automatic failover on (``auto``) or off (None)."""
    state = get_pair(settings, name)
    publish(settings, AutoFailoverSet(pair=name, after_ms=auto and auto.after_ms,
                                      lease_ms=auto and auto.lease_ms))
    return state


def set_rate(settings: KafkaSettings, name: str, max_rate: str | None,
             schedule: str | None) -> PairState:
    """Set or change a pair's bandwidth limit and schedule (validated here, first); a
    running capturer follows within a second (producers/rate.py)."""
    from journal.rates import LinkLimit
    LinkLimit.parse(max_rate, schedule)
    state = get_pair(settings, name)
    publish(settings, RateSet(pair=name, max_rate=max_rate, schedule=schedule))
    return state


def set_group(settings: KafkaSettings, group: str, members: list[str]) -> None:
    """Put ``members`` into consistency group ``group`` (journal/groups.py checks first)."""
    from journal.groups import check_new_group
    check_new_group(group, pairs(settings), members)
    for m in members:
        publish(settings, GroupSet(pair=m, group=group))


def leave_group(settings: KafkaSettings, group: str, name: str, serving: bool) -> None:
    """Take pair ``name`` out of ``group``; refused while it replicates in it."""
    from journal.groups import check_removal
    check_removal(group, pairs(settings).get(name), name, serving)
    publish(settings, GroupSet(pair=name, group=None))


def delete_pair(settings: KafkaSettings, name: str) -> PairState:
    """Delete a pair and its journal; targets and their data are left as they are."""
    from infra.topics import delete_topic, journal_topic
    state = get_pair(settings, name)
    publish(settings, Deleted(pair=name))
    delete_topic(settings.check_reachable(), journal_topic(name))
    return state
