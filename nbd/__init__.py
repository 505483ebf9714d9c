"""The NBD server core: handshake, options, TLS, the request loop and the wire formats,
behind the small :class:`nbd.server.Backend` interface (like nbdkit's core). It knows
nothing of journals or Kafka; the journaling backend lives in ``producers/``."""
