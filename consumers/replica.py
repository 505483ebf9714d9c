"""Extra replicas: another target built by replaying a pair's journal from its start,
live-following, or stopping at a point in time (the last consistency point at or before
a capture time, an epoch:seq or a topic offset)."""
from __future__ import annotations

import datetime as dt
import os
import threading


from consumers import seed
from consumers.applier import Applier, ApplyStats
from consumers.checkpoint import CheckpointStore
from infra import images, retention, telemetry
from infra.kafka import KafkaSettings
from journal.errors import BadInput
from journal.pairs import PairSpec, PairState
from journal.sequence import Limit, Position
from schemas.cipher import JournalKey


def parse_at(text: str, now: dt.datetime | None = None) -> int:
    """``now`` or an ISO-8601 time (naive = UTC) -> epoch milliseconds; refuses the future."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if text.strip().lower() == "now":
        return int(now.timestamp() * 1000)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"--at {text!r} is not a time: use ISO-8601 such as "
                       f"2026-11-25T14:30:00Z, or 'now'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    if when > now + dt.timedelta(seconds=1):
        raise BadInput(f"--at {text} is in the future (now is {now.isoformat(timespec='seconds')})"
                       f"; a replica can only stop at a point the journal already holds")
    return int(when.timestamp() * 1000)


def parse_seq(text: str) -> tuple[int, int]:
    """``E:N`` (as ``x2x status`` prints positions) or ``N`` (epoch 1) -> (epoch, seq)."""
    epoch, _, seq = text.rpartition(":")
    try:
        return (int(epoch) if epoch else 1), int(seq)
    except ValueError:
        raise BadInput(f"--seq {text!r} is invalid: use EPOCH:SEQ as x2x status shows it, "
                       f"or SEQ for epoch 1") from None


def make_limit(settings: KafkaSettings, pair: str, at: str | None, seq: str | None,
               offset: int | None) -> Limit | None:
    """Validate the point-in-time options into a Limit (None: live-follow)."""
    if sum(x is not None for x in (at, seq, offset)) > 1:
        raise BadInput("give at most one of --at, --seq and --offset")
    if offset is not None and offset < 0:
        raise BadInput(f"--offset must be 0 or more, got {offset}")
    if at is not None:
        at_ms = parse_at(at)
        first = retention.mark_at(settings, pair, 0)
        if first is None:
            raise BadInput(f"the journal of pair {pair} is empty: nothing to recover yet")
        when = dt.datetime.fromtimestamp(first.captured_at_ms / 1000, dt.timezone.utc)
        if at_ms < first.captured_at_ms and first.offset > 0:
            raise BadInput(
                f"--at {at} lies before the oldest point that can be restored: pair {pair} "
                f"keeps a history window and its journal now starts with a record captured "
                f"{when.isoformat()}; the history base holds the state before that as one "
                f"point ('x2x status' shows the oldest restorable time)")
        if at_ms < first.captured_at_ms:
            raise BadInput(
                f"--at {at} is before the journal's first entry (captured "
                f"{when.isoformat()}); there is no consistent state that early")
        return Limit(at_ms=at_ms)
    if seq is not None:
        return Limit(epoch_seq=parse_seq(seq))
    if offset is not None:
        return Limit(offset=offset)
    return None


def ensure_target(path: str, size: int) -> None:
    """Create a missing target of the volume's size: a sparse raw file, or an empty image
    in the format its name says (drill.qcow2); devices and NBD exports must exist."""
    loc = images.locate(path)
    if loc.kind != "nbd":
        images.create(loc, size)


def build(spec: PairSpec, target: str, settings: KafkaSettings, limit: Limit | None,
          stop: threading.Event | None = None,
          key: JournalKey | None = None, origin: str | None = None) -> tuple[Applier, ApplyStats]:
    """Replay the journal onto ``target`` (its own checkpoint); stops at ``limit`` if set.
    With ``origin`` (the history base), ``target`` is first seeded from it."""
    if os.path.realpath(target) in (os.path.realpath(spec.source), os.path.realpath(spec.target)):
        raise BadInput(f"{target} is the pair's own source or target; a replica needs its "
                       f"own volume")
    ensure_target(target, spec.volume_size)
    if origin is not None:
        seed_within(spec, origin, target, settings, limit)
    applier = Applier(spec, target, settings, key=key,
                      store=CheckpointStore(spec.name, target), limit=limit)
    with telemetry.span("x2x.replica.build", pair=spec.name, target=target):
        return applier, applier.run(stop=stop)


def _too_early(spec: PairSpec, limit: Limit, pos: Position) -> BadInput:
    when = dt.datetime.fromtimestamp(pos.captured_at_ms / 1000, dt.timezone.utc)
    return BadInput(
        f"pair {spec.name}: that point lies before the oldest point that can be restored, "
        f"the history base's position (epoch {pos.epoch} seq {pos.seq}, offset "
        f"{pos.offset}, captured {when.isoformat(timespec='seconds')}); the records before "
        f"it have left the journal. Choose a point after it, or a longer window next time "
        f"('x2x pair history {spec.name} --history ...')")


def seed_within(spec: PairSpec, origin: str, target: str, settings: KafkaSettings,
                limit: Limit | None) -> None:
    """Seed ``target`` from the history base ``origin``, refusing (before the copy, and
    after it, as the base may move meanwhile) a point-in-time limit the base has passed."""
    cp = CheckpointStore(spec.name, origin).load()
    if cp is not None and limit is not None and limit.precedes(cp.position):
        raise _too_early(spec, limit, cp.position)
    new = seed.seed(spec, origin, target, settings)
    if limit is not None and limit.precedes(new.position):
        CheckpointStore(spec.name, target).reset()
        raise _too_early(spec, limit, new.position)


def needs_seed(settings: KafkaSettings, state: PairState, target: str) -> bool:
    """Must a new replica start from the history base? Yes when it has no checkpoint and
    the journal of a windowed pair no longer starts at offset 0."""
    if CheckpointStore(state.spec.name, target).load() is not None or not state.history.bounded:
        return False
    low, _ = retention.watermarks(settings, state.spec.name)
    return low > 0
