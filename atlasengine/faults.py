"""Named fault points for crash-safety tests (off unless ``ATLASENGINE_FAULT`` is set).

``ATLASENGINE_FAULT=<point>:raise`` raises at that point; ``<point>:kill`` sends SIGKILL to the
process there (a real crash: no cleanup, no ``finally``); ``<point>:sleep<seconds>`` pauses
there (to hold the write lock in concurrency tests); ``<point>:abort_at_exit`` makes the process
abort (SIGABRT) when its interpreter is torn down, as a library's threads left to the teardown
can. Points, in ingest order: ``cells_x``
(counts written, obs not yet), ``cells_metadata`` (the dataset's own obs columns written, obs not
yet), ``after_cells``, ``training``, ``training_process`` (a spawned training process
starting), ``training_epoch`` (inside the Lightning loop), ``checkpoint``,
``checkpoint_written``, ``drift``, ``drift_write`` (after each
drift part is written), ``before_manifest``.
"""

from __future__ import annotations

import atexit
import os
import signal
import time


class InjectedFault(RuntimeError):
    """Raised at a fault point selected by ``ATLASENGINE_FAULT``."""


def fault_point(name: str) -> None:
    """Act on fault point ``name`` if ``ATLASENGINE_FAULT`` selects it (raise, kill or sleep); else do nothing."""
    spec = os.environ.get("ATLASENGINE_FAULT")
    if not spec:
        return
    point, _, action = spec.partition(":")
    if point != name:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "abort_at_exit":
        atexit.register(os.abort)
        return
    if action.startswith("sleep"):
        time.sleep(float(action[5:] or 5))
        return
    raise InjectedFault(f"injected fault at {name}")
