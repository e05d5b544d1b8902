"""What the command line prints: tables, and where log lines go."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from atlasengine.api import Atlas


def versions_table(atlas: Atlas) -> str:
    """Return the committed versions of ``atlas`` as a plain-text table."""
    rows = ["version  strategy   cells  new    epochs  train_s  datasets / what changed"]
    for v in atlas.versions:
        what = ", ".join(v.datasets)
        if v.relabel is not None:
            what = f"{v.relabel.n_cells} cells named {v.relabel.label!r}" + (f" ({v.relabel.note})" if v.relabel.note else "")
        rows.append(
            f"{v.number:<8} {v.strategy:<10} {v.n_cells:<6} {v.n_new_cells:<6} {v.training.get('epochs', ''):<7} "
            f"{v.training.get('seconds', 0):<8.1f} {what}"
        )
    return "\n".join(rows)


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a line is logged (it may be replaced later)."""

    @property
    def stream(self) -> TextIO:  # noqa: D102 - the attribute logging.StreamHandler reads
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool) -> None:
    """Send the engine's lines (one per long phase when no bar is shown) to stderr; ``verbose`` adds detail.

    Other libraries log only warnings and errors.
    """
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    engine = logging.getLogger("atlasengine")
    engine.handlers[:] = [handler]
    engine.propagate = False
    engine.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
