"""The crash-consistency checker: replay a pair's journal and fsck every consistency point.

The target of a pair is promised to be crash-consistent at every FLUSH (and SEAL). This
module checks that promise the way filesystem test suites replay a write log (xfstests'
dm-log-writes replay, e.g. generic/482): the journal is applied from its first record to
a scratch sparse image by the ordinary :class:`Applier`, and at every checkpoint (fired
only after the scratch image was fsynced) ``fsck.ext4 -fn`` runs on the image.

How points are judged:

* ``clean``: fsck exits 0. If the filesystem was mounted at that point, its ext4 journal
  still needs recovery and ``-n`` would skip it, checking stale metadata; so, like a mount
  after a crash would, the journal is first replayed into a throwaway copy
  (``e2fsck -E journal_only``) and the copy is checked (``journal_replayed``).
* ``not-a-filesystem``: the primary superblock has no ext2/3/4 magic and no earlier point
  held a clean filesystem: mkfs has not run, or has not finished (mkfs writes the primary
  superblock last, so a point inside mkfs lacks it; e2fsck would fall back to a backup
  superblock and report the half-made filesystem, but no kernel would mount it). Counted
  apart from clean and unclean, never as a failure, and fsck is not run.
* ``unclean``: anything else, including a superblock that vanished after a clean point.

The scratch image, its checkpoint and its lock live in a temporary directory, so the
check never touches the pair's real targets, checkpoints or status.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from infra.kafka import KafkaSettings
from infra.topics import journal_topic
from journal.errors import BadInput, X2XError
from journal.pairs import PairSpec
from journal.sequence import Limit, Position
from schemas.cipher import JournalKey

CLEAN, UNCLEAN, NOT_A_FS = "clean", "unclean", "not-a-filesystem"
#: Where the primary superblock's s_magic lies, and its value (0xEF53, little-endian).
_MAGIC_OFFSET, _MAGIC = 1024 + 0x38, b"\x53\xef"
_SKIPPED_RECOVERY = "skipping journal recovery"
FSCK_TIMEOUT = 300.0


class UncleanPoints(X2XError):
    """At least one consistency point of the journal is not a clean filesystem."""

    exit_code = 3


class NoFilesystem(X2XError):
    """No consistency point of the journal held an ext4 filesystem at all."""

    exit_code = 3


@dataclass(frozen=True)
class FsckResult:
    exit_code: int
    output: str
    journal_replayed: bool = False


@dataclass(frozen=True)
class PointResult:
    """One consistency point: where it is in the journal and what fsck said there."""

    index: int
    epoch: int
    seq: int
    offset: int
    captured_at_ms: int
    verdict: str
    exit_code: int | None = None
    journal_replayed: bool = False
    first_lines: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.epoch}:{self.seq} (offset {self.offset})"


@dataclass
class CheckReport:
    pair: str
    topic: str
    scratch_size: int
    fsck: bool
    points_checked: int = 0
    clean: int = 0
    not_a_filesystem: int = 0
    journal_replayed: int = 0
    unclean: list[PointResult] = field(default_factory=list)
    entries: int = 0
    bytes_applied: int = 0
    seconds: float = 0.0
    points: list[PointResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unclean

    def as_dict(self, with_points: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_points:
            d.pop("points")
        d["ok"] = self.ok
        return d


Fsck = Callable[[Path], FsckResult]


def require_fsck() -> str:
    path = shutil.which("fsck.ext4") or shutil.which("e2fsck")
    if path is None:
        raise BadInput("fsck.ext4 is not installed; install e2fsprogs "
                       "(apt-get install e2fsprogs) or run the check without --fsck")
    return path


def has_ext_magic(image: Path) -> bool:
    """True when the primary superblock carries the ext2/3/4 magic: what the kernel
    looks at before it will mount anything."""
    with open(image, "rb") as f:
        f.seek(_MAGIC_OFFSET)
        return f.read(2) == _MAGIC


def fsck_ext4(image: Path) -> FsckResult:
    """``fsck.ext4 -fn`` on an image file; replays a pending ext4 journal into a copy
    first, since a crash-consistent point of a mounted filesystem always has one."""
    first = _run_fsck(["-fn", str(image)])
    if _SKIPPED_RECOVERY not in first.output:
        return first
    copy = image.with_name(image.name + ".recovered")
    try:
        # A sparse (or reflinked) copy: cheap, and the scratch image stays as the journal
        # left it, for the next point.
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(image), str(copy)],
                       check=True, capture_output=True)
        replay = _run_fsck(["-E", "journal_only", "-y", str(copy)])
        if replay.exit_code & ~1:     # 1 = "errors corrected", which replaying is
            return FsckResult(replay.exit_code, replay.output, True)
        second = _run_fsck(["-fn", str(copy)])
        return FsckResult(second.exit_code, second.output, True)
    finally:
        copy.unlink(missing_ok=True)


def _run_fsck(args: list[str]) -> FsckResult:
    proc = subprocess.run([require_fsck(), *args], capture_output=True, text=True,
                          timeout=FSCK_TIMEOUT, env={**os.environ, "LC_ALL": "C"})
    return FsckResult(proc.returncode, (proc.stdout + proc.stderr).strip())


def check_journal(spec: PairSpec, settings: KafkaSettings, fsck: bool = True,
                  target_size: int | None = None, scratch_dir: str | None = None,
                  run_fsck: Fsck = fsck_ext4, key: JournalKey | None = None,
                  on_point: Callable[[PointResult], None] | None = None) -> CheckReport:
    """Replay the whole journal of ``spec`` into a scratch image; with ``fsck``, check the
    filesystem at every consistency point. Returns the report; raises JournalError if the
    journal cannot be replayed at all (the report so far is lost: the error names where)."""
    size = max(spec.volume_size, target_size or 0)
    if target_size is not None and target_size < spec.volume_size:
        raise BadInput(f"--target-size {target_size} is smaller than pair {spec.name}'s "
                       f"volume ({spec.volume_size} bytes); omit it or give at least that")
    if fsck:
        require_fsck()
    report = CheckReport(spec.name, journal_topic(spec.name), size, fsck)
    seen_fs = False
    with tempfile.TemporaryDirectory(prefix=f"x2x-check-{spec.name}-",
                                     dir=scratch_dir) as tmp:
        image = Path(tmp) / "scratch.img"
        with open(image, "wb") as f:
            f.truncate(size)

        def at_point(pos: Position) -> None:
            nonlocal seen_fs
            idx = report.points_checked
            report.points_checked += 1
            if not fsck:
                point = PointResult(idx, pos.epoch, pos.seq, pos.offset, pos.captured_at_ms,
                                    "replayed")
            elif not seen_fs and not has_ext_magic(image):
                point = PointResult(idx, pos.epoch, pos.seq, pos.offset, pos.captured_at_ms,
                                    NOT_A_FS, None, False,
                                    ["no ext2/3/4 magic in the primary superblock: mkfs has "
                                     "not completed yet"])
            else:
                # From the first superblock on, losing it again is damage, not "before mkfs".
                seen_fs = True
                r = run_fsck(image)
                verdict = CLEAN if r.exit_code == 0 else UNCLEAN
                lines = [] if verdict == CLEAN else _first_lines(r.output)
                point = PointResult(idx, pos.epoch, pos.seq, pos.offset, pos.captured_at_ms,
                                    verdict, r.exit_code, r.journal_replayed, lines)
            report.clean += point.verdict == CLEAN
            report.not_a_filesystem += point.verdict == NOT_A_FS
            report.journal_replayed += point.journal_replayed
            if point.verdict == UNCLEAN:
                report.unclean.append(point)
            report.points.append(point)
            if on_point:
                on_point(point)

        store = CheckpointStore(spec.name, str(image), directory=Path(tmp))
        # An empty limit stops the applier at the end of what the journal holds now,
        # rather than waiting for a capturer's heartbeat as --until-caught-up does.
        applier = Applier(spec, str(image), settings, key=key, store=store, publish_status=False,
                                  limit=Limit(),
                                  on_checkpoint=at_point)
        t0 = time.monotonic()
        stats = applier.run()
        report.seconds = time.monotonic() - t0
        report.entries, report.bytes_applied = stats.entries, stats.bytes_applied
    return report


def _first_lines(output: str, n: int = 6) -> list[str]:
    """The lines of fsck output worth showing: skip its banner and pass headers."""
    lines = [ln for ln in output.splitlines()
             if ln.strip() and not ln.startswith(("e2fsck ", "Pass ", "fsck from"))]
    return lines[:n]


def raise_if_failed(report: CheckReport) -> None:
    """Turn a failed check into the error the CLI exits with."""
    if report.unclean:
        first = report.unclean[0]
        raise UncleanPoints(
            f"pair {report.pair}: {len(report.unclean)} of {report.points_checked} "
            f"consistency points are not a clean filesystem (first at epoch:seq "
            f"{first.where}, fsck exit {first.exit_code}). A target recovered at those "
            f"points would need fsck: check the capturer's flush handling, and replay a "
            f"replica only up to a clean point (x2x replica add ... --seq)")
    if report.fsck and report.points_checked and report.clean == 0:
        raise NoFilesystem(
            f"pair {report.pair}: none of the {report.points_checked} consistency points "
            f"holds an ext4 filesystem (fsck found no superblock); --fsck checks ext2/3/4 "
            f"only. Run the check without --fsck to replay the journal alone")
