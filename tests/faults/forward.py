"""A TCP forwarder for the network-namespace tests, run as a process (in a namespace with
``ip netns exec``): ``python forward.py LISTEN_HOST LISTEN_PORT TO_HOST TO_PORT``.

A link cut under it (``ip link set ... down``) stalls its connections as a real network
cut does: no reset, just silence."""
from __future__ import annotations

import socket
import sys
import threading


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    listen_host, listen_port, to_host, to_port = sys.argv[1:5]
    server = socket.create_server((listen_host, int(listen_port)))
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection((to_host, int(to_port)), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main()
