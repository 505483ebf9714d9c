"""The source host on a network of its own: a network namespace linked to this one by a
veth pair, for tests of cut, thin and slow links (tests/faults).

The broker listens on 127.0.0.1, and its metadata names that address: in the namespace a
forwarder (tests/faults/forward.py) listens there and forwards over the link to this
side, where another one forwards to the broker. Cutting the veth link is a real network
cut: silence, no reset. ``shape`` puts a ``tc ... tbf`` on the source's side of the link
(its uploads: what the journal sends); the namespace's forwarder can add delay and loss
and count the bytes the source sends."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

FORWARD = str(Path(__file__).parent / "faults" / "forward.py")
#: A new name and subnet for every namespace of the session: the kernel tears a veth
#: pair down asynchronously, so the next test must not reuse the last one's names.
_serial = itertools.count()


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


class SourceNet:
    """A network namespace for the source host, linked to this one by a veth pair."""

    def __init__(self, broker_port: int, delay_ms: float = 0.0, loss: float = 0.0,
                 count: Path | None = None) -> None:
        k = 20 + (os.getpid() + 7 * next(_serial)) % 230
        self.ns, self.host_if, self.ns_if = f"x2xsrc{k}", f"x2xh{k}", f"x2xn{k}"
        # Leftovers of a run that was killed before its clean-up.
        for stale in (("ip", "netns", "del", self.ns), ("ip", "link", "del", self.host_if)):
            subprocess.run(stale, capture_output=True)
        self.host_ip = f"10.231.{k}.1"
        #: The namespace's end of the link: reachable from this side, without the
        #: forwarder's delay (which only the broker's traffic crosses).
        self.ns_ip = f"10.231.{k}.2"
        self.prefix = ("ip", "netns", "exec", self.ns)
        self.procs: list[subprocess.Popen] = []
        self.count = count
        try:
            sh("ip", "netns", "add", self.ns)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot make a network namespace here ({e.stderr.strip()})")
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh(*self.prefix, "ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
        sh(*self.prefix, "ip", "link", "set", self.ns_if, "up")
        sh(*self.prefix, "ip", "link", "set", "lo", "up")
        p = str(broker_port)
        self._forward((), self.host_ip, p, "127.0.0.1", p)
        wan = [f"--delay-ms={delay_ms}", f"--loss={loss}"] + (
            [f"--count={count}"] if count else [])
        self._forward(self.prefix, "127.0.0.1", p, self.host_ip, p, *wan)

    def _forward(self, prefix: tuple[str, ...], *args: str) -> None:
        proc = subprocess.Popen([*prefix, sys.executable, FORWARD, *args],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"

    def shape(self, rate: str = "10mbit") -> None:
        """Limit what the source sends over the link to ``rate`` (tc's words)."""
        sh(*self.prefix, "tc", "qdisc", "replace", "dev", self.ns_if, "root", "tbf",
           "rate", rate, "burst", "32kbit", "latency", "400ms")

    def sent(self) -> int:
        """Bytes the source's forwarder sent towards the broker so far (``count``)."""
        assert self.count is not None
        try:
            return int(self.count.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return 0

    def cut(self) -> None:
        sh("ip", "link", "set", self.host_if, "down")

    def heal(self) -> None:
        sh("ip", "link", "set", self.host_if, "up")

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
