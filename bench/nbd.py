"""Scenario 2: capture overhead via NBD, measured by ``bench/nbd_capture.py`` (owned by the
NBD capturer: nbdcopy into the x2x export vs into qemu-nbd). This harness only calls it:
through ``run(...) -> dict`` if that module offers one, passing the arguments it names
(``quick``, ``ctx``, ``settings``, ``workdir``); otherwise the scenario is skipped with the
reason, and the module still runs alone as ``python -m bench.nbd_capture``."""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from bench.common import Context

TITLE = "Capture overhead via NBD: nbdcopy into the x2x export vs into qemu-nbd"


def run(ctx: Context) -> dict[str, Any]:
    try:
        mod = importlib.import_module("bench.nbd_capture")
    except ImportError as e:
        return {"skipped": f"bench/nbd_capture.py is not available ({e})"}
    fn = getattr(mod, "run", None)
    if not callable(fn):
        return {"skipped": "bench/nbd_capture.py offers no run(quick=..., ...) -> dict yet; "
                           "run it alone: python -m bench.nbd_capture"}
    offer = {"quick": ctx.quick, "ctx": ctx, "settings": ctx.settings,
             "workdir": ctx.dir("nbd_capture")}
    params = inspect.signature(fn).parameters
    result = fn(**{k: v for k, v in offer.items() if k in params})
    if not isinstance(result, dict):
        raise TypeError(f"bench.nbd_capture.run returned {type(result).__name__}, not a dict")
    return {"title": TITLE, **result}
