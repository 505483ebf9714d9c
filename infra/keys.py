"""Finding a pair's journal key: ``--key-file`` or ``$X2X_HOME/keys/<pair>.key``."""
from __future__ import annotations

from pathlib import Path

from infra.paths import x2x_home
from journal.errors import BadInput
from journal.pairs import PairSpec
from schemas.cipher import JournalKey, create_key, load_key


def default_key_path(pair: str) -> Path:
    d = x2x_home() / "keys"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d / f"{pair}.key"


def key_for_create(pair: str, key_file: str | None, encrypt: bool) -> JournalKey | None:
    """The key a new pair is created with: read from ``key_file`` if it exists, else
    generated there (or at the default path with ``encrypt``)."""
    if not key_file and not encrypt:
        return None
    path = Path(key_file) if key_file else default_key_path(pair)
    return load_key(path) if path.exists() else create_key(path)


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
    return key
