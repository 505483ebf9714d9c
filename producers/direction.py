"""Which capturer state a capture starts from: the pair's direction and a forced
baseline.

The capturer state (epoch, next seq, hash map: producers/state.py) and the write-intent
bitmap (producers/intent.py) are owned here for the start of a capture, so the CLI
only says what the operator asked for (:func:`prepare_capture`).
"""
from __future__ import annotations

from pathlib import Path

from infra.paths import pair_dir
from infra.volumes import open_volume
from journal.blocks import HASH_LEN, hash_buffer
from journal.epochs import after_promotion
from journal.errors import BadInput
from journal.pairs import PairState
from producers import intent, trace_resume
from producers.baseline import new_hash_map
from producers.state import CaptureState, StateStore


def prepare_capture(state: PairState, rebaseline: bool) -> StateStore:
    """The capturer state store of the pair's active source, ready for a capture to start.

    ``rebaseline``: forget the hash map and the write-intent bitmap and mark the saved
    state unclean, so the capture journals every block in a new epoch. Otherwise a
    promoted side starts its new epoch (:func:`prepare_direction`). Refused while a
    failover is under way: the source is being sealed."""
    name = state.spec.name
    if state.state == "failing-over":
        raise BadInput(f"pair {name} is failing over; wait for 'x2x pair failover' to end")
    store = store_for(state)
    if not rebaseline:
        prepare_direction(state, store)     # promoted side: new epoch, no baseline
        return store
    saved = store.load_state()
    if saved:
        saved.clean = False
        store.save(saved)
    store.hashes.unlink(missing_ok=True)
    intent.forget(name)         # else an NBD capturer would resend only marked blocks
    trace_resume.forget(store.meta.parent)      # else a trace capturer would compare
    return store


def store_for(state: PairState) -> StateStore:
    """The capturer state of the active source: the original source keeps the pair's
    folder (as before failover existed); the reverse direction has its own, so the two
    sides' epochs and hash maps never mix when both live on one host."""
    if not state.reversed:
        return StateStore(state.spec.name, incarnation=state.created_at_ms)
    d: Path = pair_dir(state.spec.name) / "reverse"
    d.mkdir(parents=True, exist_ok=True)
    return StateStore(state.spec.name, d, incarnation=state.created_at_ms)


def prepare_direction(state: PairState, store: StateStore) -> bool:
    """After a promotion, make the promoted side's capturer start a new epoch above every
    epoch of the journal, without a baseline: the promoted volume equals the source at
    the SEAL (or last consistency point), and its target is brought level by failback's
    hash comparison, not by a full copy. Returns True when a new epoch was prepared."""
    saved = store.load_state()
    epoch = after_promotion(state.promoted_epoch, saved.epoch if saved else None)
    if epoch is None:
        return False            # nothing promoted, or this side captures above it already
    spec = state.active_spec
    with open_volume(spec.source) as vol:
        hashes = new_hash_map(vol.size, spec.block_size)
        chunk = bytearray(max((8 << 20) // spec.block_size, 1) * spec.block_size)
        for base in range(0, vol.size, len(chunk)):
            view = memoryview(chunk)[:min(len(chunk), vol.size - base)]
            vol.stream_into(base, view)
            first = base // spec.block_size
            hashes[first * HASH_LEN:first * HASH_LEN + -(-len(view) // spec.block_size)
                   * HASH_LEN] = b"".join(hash_buffer(view, spec.block_size))
        opening = CaptureState.opening(epoch, spec.block_size, vol.size)
        opening.clean = True    # nothing to resend: the hash map describes the volume
        store.save(opening, hashes)
    return True
