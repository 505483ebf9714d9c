"""Finding a pair's journal key: ``--key-file`` or ``$X2X_HOME/keys/<pair>.key``.

Keys this process was given are remembered by key id, so the control plane can sign and
check a keyed pair's events and heartbeats (infra/control.py) with a key named by
``--key-file`` as well as one at the default path.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from infra.paths import x2x_home
from journal.errors import BadInput
from journal.pairs import PairSpec
from schemas.cipher import JournalKey, create_key, load_key


#: Keys this process loaded, by key id (never written anywhere).
_known: dict[str, JournalKey] = {}


def remember(key: JournalKey) -> JournalKey:
    _known[key.key_id] = replace(key, incarnation=0)
    return key


def remember_file(key_file: str | None) -> None:
    """Load ``key_file`` (if given and present) before anything reads the control topics,
    so the pair's signed events verify with it."""
    if key_file and Path(key_file).exists():
        remember(load_key(key_file))


def lookup(spec: PairSpec) -> JournalKey | None:
    """The key of keyed ``spec`` bound to its incarnation, if this host has it: one this
    process loaded, or the one at the pair's default path; None for an unkeyed pair or
    where the key is not here."""
    if not spec.key_id:
        return None
    key = _known.get(spec.key_id)
    if key is None:
        path = default_key_path(spec.name)
        try:
            key = load_key(path) if path.exists() else None
        except BadInput:
            key = None
        if key is None or key.key_id != spec.key_id:
            return None
    return key.bound(spec.incarnation)


def default_key_path(pair: str) -> Path:
    d = x2x_home() / "keys"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d / f"{pair}.key"


def key_for_create(pair: str, key_file: str | None, encrypt: bool) -> JournalKey | None:
    """The key a new pair is created with: read from ``key_file`` if it exists, else
    generated there; with ``encrypt``, always a new key at the default path. A key left
    there by an earlier pair of the same name is never taken silently: its journal
    records would pass as the new pair's."""
    if not key_file and not encrypt:
        return None
    if key_file:
        path = Path(key_file)
        return remember(load_key(path) if path.exists() else create_key(path))
    path = default_key_path(pair)
    if path.exists():
        old = load_key(path)
        raise BadInput(f"a key for a pair named {pair} is already at {path} (key id "
                       f"{old.key_id}), left by an earlier pair of that name: move it away "
                       f"to get a new key, or pass --key-file {path} to use it on purpose")
    return remember(create_key(path))


def retire_key(pair: str) -> Path | None:
    """Move the pair's default key out of the way (kept, to read its old journal), so a
    new pair of the same name gets a new key; returns where it went."""
    path = default_key_path(pair)
    if not path.exists():
        return None
    retired = path.parent / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    dest = retired / f"{pair}.{load_key(path).key_id}.{int(time.time())}.key"
    path.rename(dest)
    return dest


def key_for(spec: PairSpec, key_file: str | None) -> JournalKey | None:
    """The key to capture or apply ``spec`` with; checks it is the pair's key."""
    if not spec.key_id:
        if key_file:
            raise BadInput(f"pair {spec.name} is not encrypted; drop --key-file (or recreate "
                           f"the pair with --key-file to encrypt it)")
        return None
    path = Path(key_file) if key_file else default_key_path(spec.name)
    if not path.exists():
        raise BadInput(f"pair {spec.name} is encrypted (key id {spec.key_id}) and no key was "
                       f"found at {path}; copy the pair's key file there or pass --key-file")
    key = load_key(path)
    if key.key_id != spec.key_id:
        raise BadInput(f"key file {path} has key id {key.key_id}, but pair {spec.name} was "
                       f"created with key id {spec.key_id}: wrong key")
    return remember(key).bound(spec.incarnation)
