"""Wall-clock time in the journal's unit: every record, event and beat is stamped in
milliseconds since the epoch, and RPO is measured against those stamps."""
from __future__ import annotations

import time


def now_ms() -> int:
    """Now, in milliseconds since the Unix epoch."""
    return int(time.time() * 1000)
