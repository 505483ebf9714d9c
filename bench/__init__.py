"""x2x benchmarks against peers, measured side by side in one run (``make bench``).

``python -m bench [--quick] [--out DIR] [--only NAME ...]`` starts its own embedded broker
on a free port with its own ``X2X_HOME`` in a temporary directory, runs every scenario,
and writes ``DIR/latest.json`` and ``DIR/latest.md`` (default ``bench/results``).

Each scenario is one module with ``TITLE`` and ``run(ctx: Context) -> dict``; the dict
holds ``figures``: every figure is an x2x measurement next to its peer's and the ratio
x2x / peer, with ``better`` saying which direction wins. A scenario that cannot run here
returns ``{"skipped": "why"}``. Nothing here asserts timings: the numbers are for people.

``bench/nbd_capture.py`` (owned by the NBD capturer) plugs in through
``run(quick=..., ...) -> dict`` when it offers one; see ``bench/nbd.py``.
"""
