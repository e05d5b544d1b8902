"""Progress of long phases: one bar per phase on a terminal, one log line per phase otherwise.

A phase is training, the Fisher, the embedding, drift or the report. On a terminal (or in a
notebook) each shows one ``tqdm`` bar that stays on screen when done; in a log file or CI each
writes one line to the ``atlasengine`` logger when it ends (``training reference: 120 epochs
in 8.1 s``). The command line shows those lines; ``-v`` adds detail.

Example
-------
>>> with phase("counting", total=3, unit="step", progress=False) as p:
...     for _ in range(3):
...         p.advance()
>>> p.done
3
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("atlasengine")


def interactive() -> bool:
    """Whether a person is watching: stderr is a terminal, or the code runs in a notebook."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        return False
    return "ipykernel" in sys.modules


class Phase:
    """A running phase: :meth:`advance` it; ``note`` is appended to its closing line."""

    def __init__(self, name: str, total: int | None, unit: str, bar: bool) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.done = 0
        self.note = ""
        self.start = time.perf_counter()
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            size = shutil.get_terminal_size((0, 0))
            sized = size.columns > 0 and size.lines > 0  # a terminal of unknown size (script, some CI) reads 0 x 0,
            self._bar = tqdm(total=total, desc=name, unit=unit, leave=True, file=sys.stderr, dynamic_ncols=sized,
                             **({} if sized else {"ncols": 100, "nrows": 40}))  # where tqdm would hide every bar

    def advance(self, n: int = 1, **postfix: float) -> None:
        """Count ``n`` more units done; ``postfix`` values (e.g. ``loss``) show beside the bar."""
        self.done += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def close(self, failed: bool = False) -> None:
        """End the phase: close the bar, or log its line."""
        seconds = time.perf_counter() - self.start
        line = f"{self.name}: {self.done} {self.unit} in {seconds:.1f} s" + (f" ({self.note})" if self.note else "")
        if failed:
            line += " (failed)"
        if self._bar is not None:
            if self.note:
                self._bar.set_postfix_str(self.note, refresh=False)
            self._bar.close()
            log.debug(line)
        else:
            log.info(line)


@contextmanager
def phase(name: str, total: int | None = None, unit: str = "it", progress: bool | None = None) -> Iterator[Phase]:
    """Run a phase with one progress bar (``progress`` True, or None on a terminal) or one log line.

    Parameters
    ----------
    name
        What the phase does, e.g. ``"training reference"``.
    total
        Units the phase will take at most (epochs, cells), if known.
    unit
        What is counted.
    progress
        None: a bar when :func:`interactive`, a log line otherwise; True / False force it.
    """
    p = Phase(name, total, unit, interactive() if progress is None else progress)
    try:
        yield p
    except BaseException:
        p.close(failed=True)
        raise
    p.close()
