"""Progress: one bar per phase on a terminal, whatever size the terminal says it is."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

SCRIPT = """
from atlasengine.progress import phase
with phase("counting cells", total=3, unit="step") as p:
    for _ in range(3):
        p.advance()
"""


def test_a_terminal_of_unknown_size_still_shows_the_bar():
    parent, child = pty.openpty()  # a new pseudo-terminal reads 0 x 0, as under `script` or some CI runners
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        proc = subprocess.run([sys.executable, "-c", SCRIPT], stdin=child, stdout=child, stderr=child, env=env,
                              timeout=120)
        assert proc.returncode == 0
        os.close(child)
        child = -1
        out = b""
        while True:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # the terminal closed: everything was read
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(parent)
        if child >= 0:
            os.close(child)
    text = out.decode("utf-8", "replace")
    assert "counting cells" in text and "3/3" in text, text
