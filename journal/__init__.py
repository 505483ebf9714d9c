"""The pure domain of x2x: ops, entries, extents, sequence rules, block hashing.

Nothing here touches Kafka, sockets or files; the invariants are written down in
``journal/DESIGN.md``.
"""
