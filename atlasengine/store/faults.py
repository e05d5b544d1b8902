"""Named fault points for crash-safety tests (off unless ``ATLASENGINE_FAULT`` is set).

``ATLASENGINE_FAULT=<point>:raise`` raises at that point; ``<point>:kill`` sends SIGKILL to the
process there (a real crash: no cleanup, no ``finally``). Points: ``after_cells``,
``training``, ``checkpoint``, ``drift``, ``before_manifest``.
"""

from __future__ import annotations

import os
import signal


class InjectedFault(RuntimeError):
    """Raised at a fault point selected by ``ATLASENGINE_FAULT``."""


def fault_point(name: str) -> None:
    spec = os.environ.get("ATLASENGINE_FAULT")
    if not spec:
        return
    point, _, action = spec.partition(":")
    if point != name:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {name}")
