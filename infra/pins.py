"""What this host confirmed about a pair: its source, its target and its key id.

A capturer or applier takes the pair's spec from the control topic at every start, and
whoever can write that topic could otherwise point it at another device (the target
host's system disk) or turn encryption off. So the first start on a host pins the spec's
volumes and key id in ``$X2X_HOME/pairs/<pair>/pinned.json``; a later spec that differs
is refused, naming both, until an operator confirms it on this host
(``--accept-spec-change``), or deletes the pair here (``x2x pair delete``).
"""
from __future__ import annotations

import time

from infra.files import read_json, write_json
from infra.paths import pair_dir
from journal.errors import BadInput
from journal.pairs import PairSpec

_FILE = "pinned.json"
_FIELDS = ("source", "target", "key_id")


class SpecChanged(BadInput):
    """The control topic's spec of a pair differs from what this host pinned."""


def check(spec: PairSpec, accept: bool = False) -> None:
    """Pin ``spec`` on first use (or when ``accept``); refuse it if it differs."""
    path = pair_dir(spec.name) / _FILE
    wanted = {f: getattr(spec, f) for f in _FIELDS}
    pinned = read_json(path)
    if pinned is not None and not accept:
        changed = [f for f in _FIELDS if pinned.get(f) != wanted[f]]
        if changed:
            what = "; ".join(f"{f} {pinned.get(f)!r} -> {wanted[f]!r}" for f in changed)
            raise SpecChanged(
                f"pair {spec.name}: the control topic now says {what}, but this host "
                f"pinned the former on {time.ctime(pinned.get('pinned_at', 0))}. Nothing "
                f"was read or written. If an operator changed the pair on purpose, confirm "
                f"it here with --accept-spec-change; if not, someone wrote the control "
                f"topic (docs/security.md)")
        return
    write_json(path, {**wanted, "pinned_at": time.time()})


def forget(pair: str) -> None:
    """This host's pin of ``pair`` goes (the pair was deleted here)."""
    (pair_dir(pair) / _FILE).unlink(missing_ok=True)
