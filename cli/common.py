"""Helpers every CLI command shares: Kafka settings from the global options, printing."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from infra.kafka import KafkaSettings

if TYPE_CHECKING:
    from consumers.applier import ApplyStats

# Off a terminal (CI logs, pipes, journald) rich would wrap at 80 columns, truncate table
# cells and split error lines that operators grep for; tables there are as wide as needed.
console = Console(width=None if sys.stdout.isatty() else 10_000)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 10_000)


@dataclass
class Globals:
    bootstrap: str | None = None
    kafka_config: str | None = None
    compression: str | None = None

    def settings(self) -> KafkaSettings:
        return KafkaSettings.resolve(self.bootstrap, self.kafka_config, self.compression)


def settings(ctx: typer.Context) -> KafkaSettings:
    g = ctx.find_root().obj
    return (g or Globals()).settings()


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_share(stats: "ApplyStats") -> str:
    """What an apply run's target took of it: a run that mostly wrote, and waited for its
    writes, is bound by writing its target, not by the broker."""
    return (f"writing the target {stats.write_s:.2f} s, reading waited for it "
            f"{stats.write_wait_s:.2f} s")
