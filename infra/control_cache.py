"""This host's fold of the control topics, kept so that a call reads only what is new.

``x2x status``, ``pair show`` and every service start need the pairs' state, folded from
every control event ever published. The fold, the offset up to which each control topic
was read and the newest event's place are kept in ``$X2X_HOME/cache`` (mode 0600, written
atomically); the next call reads from those offsets on and folds only the new events.

The cache is used only while it provably describes the same topics: it is keyed by the
cluster id and each control topic's id (a recreated topic has a new id), and an event
older than the newest one folded (a late record from a host with a slow clock) makes
the call fold everything again, so a cached fold always equals a fresh one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

from infra.files import atomic_write, read_json
from infra.paths import x2x_home
from journal.events import Promoted
from journal.fencing import AutoFailover
from journal.history import HistorySettings
from journal.pairs import PairSpec, PairState
from journal.rates import LinkLimit, parse_schedule

log = logging.getLogger("x2x.control")
_VERSION = 7      # 7: consistency groups; 6: the link's rate; 5: automatic failover; 4: the history window; 3: typed PairState (reason, cause, promotion),
#: specs carry their incarnation, folds verify signed events


@dataclass
class Folded:
    """A fold of the control topics up to ``offsets`` (the next offset of each);
    ``last_key`` is the fold-order key of the newest event in it (infra/control.py)."""

    identity: str
    offsets: dict[str, int]
    last_key: tuple[int, int]
    pairs: dict[str, PairState]
    #: Key ids of keyed pairs whose signed events this host could not check (their key
    #: was not here): once one of those keys is here, the fold is made again.
    unchecked: frozenset[str] = frozenset()


def identity(admin: AdminClient, cluster_id: str | None, topics: tuple[str, ...]) -> str | None:
    """The cluster's id and the control topics' ids, or None where the broker does not
    tell them (then nothing is cached)."""
    if not cluster_id:
        return None
    try:
        futures = admin.describe_topics(TopicCollection(list(topics)), request_timeout=10)
        ids = [str(futures[t].result().topic_id) for t in topics]
    except (KafkaException, KeyError, AttributeError) as e:
        log.debug("no control cache: topic ids unavailable (%s)", e)
        return None
    return "|".join([cluster_id, *ids])


def _path(bootstrap: str) -> Path:
    d = x2x_home() / "cache"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"control-{hashlib.blake2b(bootstrap.encode(), digest_size=8).hexdigest()}.json"


def _state_to_json(p: PairState) -> dict:
    raw = asdict(p)
    raw["abandoned_epochs"] = sorted(p.abandoned_epochs)
    raw["link"] = {"max_rate": p.link.max_rate,
                   "schedule": p.link.schedule and p.link.schedule.text}
    return raw


def _state_from_json(raw: dict) -> PairState:
    promotion = raw["promotion"] and Promoted(**raw["promotion"])
    p = PairState(**{**raw, "spec": PairSpec(**raw["spec"]), "promotion": promotion,
                     "history": HistorySettings(**raw.get("history", {})),
                     "auto": raw.get("auto") and AutoFailover(**raw["auto"]),
                     "link": _link_from_json(raw.get("link") or {})})
    return replace(p, abandoned_epochs=frozenset(raw["abandoned_epochs"]))


def _link_from_json(raw: dict) -> LinkLimit:
    schedule = raw.get("schedule")
    return LinkLimit(raw.get("max_rate"), parse_schedule(schedule) if schedule else None)


def load(bootstrap: str, ident: str) -> Folded | None:
    try:
        raw = read_json(_path(bootstrap))
    except (OSError, ValueError) as e:
        log.info("ignoring the control cache: %s", e)
        return None
    if not isinstance(raw, dict) or raw.get("version") != _VERSION or raw.get("identity") != ident:
        return None
    try:
        at_ms, rank = raw["last_key"]
        return Folded(ident, {k: int(v) for k, v in raw["offsets"].items()},
                      (int(at_ms), int(rank)),
                      {k: _state_from_json(v) for k, v in raw["pairs"].items()},
                      frozenset(raw.get("unchecked", ())))
    except (KeyError, TypeError, ValueError) as e:
        log.info("ignoring the control cache: %s", e)
        return None


def save(bootstrap: str, folded: Folded) -> None:
    doc = {"version": _VERSION, "identity": folded.identity, "offsets": folded.offsets,
           "last_key": list(folded.last_key),
           "pairs": {k: _state_to_json(v) for k, v in folded.pairs.items()},
           "unchecked": sorted(folded.unchecked)}
    try:
        atomic_write(_path(bootstrap), json.dumps(doc, sort_keys=True).encode())
    except OSError as e:
        log.info("cannot keep the control cache: %s", e)
