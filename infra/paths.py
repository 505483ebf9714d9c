"""Where x2x keeps local state: ``$X2X_HOME`` (default ``~/.x2x``)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def x2x_home() -> Path:
    home = Path(os.environ.get("X2X_HOME") or Path.home() / ".x2x")
    home.mkdir(parents=True, exist_ok=True)
    return home


def pair_dir(pair: str) -> Path:
    d = x2x_home() / "pairs" / pair
    d.mkdir(parents=True, exist_ok=True)
    return d


def volume_key(path: str) -> str:
    """A file-name-safe key for a volume path (one checkpoint per target volume)."""
    real = path if "://" in path else os.path.realpath(path)   # NBD URIs are no paths
    return Path(real.split("?")[0]).name + "-" + hashlib.blake2b(real.encode(), digest_size=6).hexdigest()
