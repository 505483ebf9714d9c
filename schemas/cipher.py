"""End-to-end protection of a pair's journal with a key only the two ends hold.

Each op's data is encrypted with AES-256-GCM (random 96-bit nonce; the op's pair,
incarnation, epoch, seq, kind, offset and length as associated data), and the whole entry —
header, order, seqs, plaintext — is authenticated by a keyed blake3 MAC in the entry's
digest field. So a party with write access to the topic cannot inject, reorder, replay or
alter writes without the applier refusing them, and one with read access learns nothing of
the data. The same key signs the pair's control events and heartbeats (docs/security.md).

Every MAC key is derived per purpose (entry, control, status: a MAC of one kind never
passes as another) and bound to the pair's *incarnation*, the time its ``created`` event
was stamped: a pair deleted and created again under the same name and key has a new
incarnation, so nothing its predecessor wrote passes as the new pair's.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from journal.digest import digest_of
from journal.errors import BadInput, CorruptEntry
from journal.ops import Entry, Op, OpKind
from schemas.codec import decode_entry

CIPHER = "aes-256-gcm"
KEY_LEN = 32
NONCE_LEN = 12
_KINDS = {kind: i for i, kind in enumerate(OpKind)}
_AAD = struct.Struct("<qqqBqq")         # incarnation, epoch, seq, kind, offset, length
_INCARNATION = struct.Struct("<q")


def _derive(context: str, key: bytes) -> bytes:
    return blake3.blake3(key, derive_key_context=f"x2x 2026-11 {context}").digest()


@dataclass(frozen=True)
class JournalKey:
    """A pair's key: AES-256-GCM for payloads, keyed blake3 for the MACs of entries,
    control events and heartbeats; ``incarnation`` is the pair's (see the module doc)."""

    raw: bytes
    incarnation: int = 0

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise BadInput(f"a journal key is {KEY_LEN} bytes, this one is {len(self.raw)}")

    @property
    def key_id(self) -> str:
        """Safe to publish: identifies the key without revealing it."""
        return _derive("key id", self.raw)[:8].hex()

    def bound(self, incarnation: int) -> "JournalKey":
        """This key for the pair incarnation created at ``incarnation`` (ms)."""
        return replace(self, incarnation=incarnation)

    def _mac_key(self, purpose: str) -> bytes:
        return blake3.blake3(_INCARNATION.pack(self.incarnation),
                             key=_derive(purpose, self.raw)).digest()

    @property
    def mac_key(self) -> bytes:
        return self._mac_key("entry mac")

    def control_mac(self, body: bytes) -> bytes:
        """MAC of an encoded control event (with its own MAC field empty)."""
        return blake3.blake3(body, key=self._mac_key("control mac")).digest()

    def status_mac(self, body: bytes) -> bytes:
        """MAC of an encoded heartbeat (with its own MAC field empty)."""
        return blake3.blake3(body, key=self._mac_key("status mac")).digest()

    def _aad(self, entry: Entry, seq: int, op: Op) -> bytes:
        return entry.pair.encode() + _AAD.pack(self.incarnation, entry.epoch, seq,
                                               _KINDS[op.kind], op.offset, op.length)

    def _aead(self) -> AESGCM:
        return AESGCM(_derive("payload encryption", self.raw))

    def encrypt(self, entry: Entry) -> Entry:
        """Encrypt the data of every op that carries data (the digest stays as it is)."""
        aead, ops = self._aead(), []
        for seq, op in enumerate(entry.ops, entry.first_seq):
            if op.data:
                nonce = os.urandom(NONCE_LEN)
                op = Op(op.kind, op.offset, op.length,
                        nonce + aead.encrypt(nonce, op.data, self._aad(entry, seq, op)))
            ops.append(op)
        return replace(entry, ops=tuple(ops), cipher=CIPHER)

    def decrypt(self, entry: Entry, where: str) -> Entry:
        """Decrypt every op, refusing the entry whole if any op fails authentication."""
        if entry.cipher != CIPHER:
            raise CorruptEntry(f"record at {where} is not encrypted ({entry.cipher or 'plain'})"
                               f" but pair {entry.pair} requires {CIPHER}: it was not written "
                               f"by the pair's capturer; nothing of it was applied")
        aead, ops = self._aead(), []
        for seq, op in enumerate(entry.ops, entry.first_seq):
            if op.data:
                if len(op.data) < NONCE_LEN + 16:
                    raise CorruptEntry(f"op seq {seq} at {where} is too short to be encrypted")
                aad = self._aad(entry, seq, op)
                try:
                    plain = aead.decrypt(op.data[:NONCE_LEN], op.data[NONCE_LEN:], aad)
                except InvalidTag:
                    raise CorruptEntry(
                        f"op seq {seq} at {where} fails authentication: forged with another "
                        f"key, altered, moved from another place in the journal or left by "
                        f"an earlier pair of this name; nothing of the entry was applied"
                    ) from None
                op = Op(op.kind, op.offset, op.length, plain)
            ops.append(op)
        return replace(entry, ops=tuple(ops), cipher="")


def load_key(path: str | Path) -> JournalKey:
    """Read a key file: 32 raw bytes or 64 hex characters."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read key file {path}: {e.strerror}") from None
    text = data.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return JournalKey(bytes.fromhex(text.decode()))
        except ValueError:
            pass
    if len(data) == KEY_LEN:
        return JournalKey(data)
    raise BadInput(f"key file {path} holds {len(data)} bytes; expected {KEY_LEN} raw bytes "
                   f"or {2 * KEY_LEN} hex characters")


def create_key(path: str | Path) -> JournalKey:
    """Generate a new key into ``path`` (mode 0600, never overwriting)."""
    key = JournalKey(os.urandom(KEY_LEN))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BadInput(f"key file {path} exists already; use it, or choose another path") \
            from None
    with os.fdopen(fd, "w") as f:
        f.write(key.raw.hex() + "\n")
    return key


def open_record(data: bytes, pair: str, key: JournalKey | None, where: str) -> Entry:
    """Everything the applier checks of one record before it may apply any of it:
    decoding and fingerprint, the pair, decryption, and the (keyed) digest."""
    try:
        entry = decode_entry(data)
    except CorruptEntry as e:
        raise type(e)(f"{e} [{where}]; nothing of it was applied") from None
    if entry.pair != pair:
        raise CorruptEntry(f"record at {where} belongs to pair {entry.pair!r}, not {pair!r}; "
                           f"something else writes to this topic")
    if key is not None:
        entry = key.decrypt(entry, where)
    elif entry.cipher:
        raise CorruptEntry(f"record at {where} is encrypted ({entry.cipher}) but no key was "
                           f"given; pass the pair's --key-file")
    if digest_of(entry, key.mac_key if key else None) != entry.digest:
        raise CorruptEntry(f"digest mismatch at {where} (epoch {entry.epoch} seq "
                           f"{entry.first_seq}..{entry.last_seq}): the record was altered, "
                           f"corrupted or forged; nothing of it was applied")
    return entry
