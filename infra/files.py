"""Crash-safe small-file writes: checkpoints and capturer state survive a SIGKILL whole."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes | bytearray, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file;
    not ``durable``: readers never see a torn file, but a host crash may lose it (for
    advisory files written often, whose fsyncs would compete with the volumes')."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_whole(path: Path) -> bytearray | None:
    """``path``'s bytes, read into one bytearray a caller may keep and change (read as
    bytes and copied, a large file cost twice its size); None if it is missing or
    shrank while read (not a file to trust)."""
    try:
        with open(path, "rb", buffering=0) as f:
            out = bytearray(os.fstat(f.fileno()).st_size)
            view, got = memoryview(out), 0
            while got < len(out):
                n = f.readinto(view[got:])
                if not n:
                    return None
                got += n
            return out
    except FileNotFoundError:
        return None


def write_json(path: Path, value: Any, durable: bool = True) -> None:
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode(), durable)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
