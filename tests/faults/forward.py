"""A TCP forwarder for the network-namespace tests, run as a process (in a namespace with
``ip netns exec``)::

    python forward.py LISTEN_HOST LISTEN_PORT TO_HOST TO_PORT [--delay-ms N] [--loss P]
                      [--count FILE]

A link cut under it (``ip link set ... down``) stalls its connections as a real network
cut does: no reset, just silence.

A WAN, as far as TCP lets a proxy emulate one (there is no netem here): ``--delay-ms``
holds every chunk that long in each direction (order kept, throughput not limited:
``tc ... tbf`` on the link does that); ``--loss P`` delays a chunk by a retransmission
timeout (200 ms) more with probability P, which is what a lost segment costs a TCP
stream (a proxy cannot drop bytes of a stream without corrupting it). ``--count FILE``
writes ``<bytes to upstream> <bytes back>`` to FILE every 0.2 s."""
from __future__ import annotations

import argparse
import os
import queue
import random
import socket
import threading
import time

#: What a lost segment costs a TCP stream: about one retransmission timeout.
RTO = 0.2
counted = [0, 0]
_counted_lock = threading.Lock()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _pipe(a: socket.socket, b: socket.socket, way: int, delay: float, loss: float) -> None:
    """Copy a -> b, each chunk ``delay`` later (and an RTO more, at random ``loss``)."""
    # Bounded, so a shaped link still pushes back on the sender as TCP would.
    q: queue.Queue[tuple[float, bytes]] = queue.Queue(maxsize=16)

    def send() -> None:
        try:
            while True:
                due, data = q.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                b.sendall(data)
                with _counted_lock:
                    counted[way] += len(data)
        except OSError:
            pass
        finally:
            _close(a, b)

    threading.Thread(target=send, daemon=True).start()
    last = 0.0
    try:
        while data := a.recv(1 << 16):
            due = time.monotonic() + delay + (RTO if loss and random.random() < loss else 0.0)
            last = max(last, due)         # a stream: nothing overtakes a delayed chunk
            q.put((last, data))
    except OSError:
        pass
    q.put((0.0, b""))


def _count(path: str) -> None:
    while True:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{counted[0]} {counted[1]}\n")
        os.replace(tmp, path)
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("listen_host", "listen_port", "to_host", "to_port"):
        ap.add_argument(name)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--count")
    a = ap.parse_args()
    server = socket.create_server((a.listen_host, int(a.listen_port)))
    if a.count:
        threading.Thread(target=_count, args=(a.count,), daemon=True).start()
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection((a.to_host, int(a.to_port)), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for x, y, way in ((client, upstream, 0), (upstream, client, 1)):
            threading.Thread(target=_pipe, args=(x, y, way, a.delay_ms / 1000, a.loss),
                             daemon=True).start()


if __name__ == "__main__":
    main()
