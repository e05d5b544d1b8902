r"""Names in figures are plain text: a ``$`` in a cell type or batch is not read as mathtext.

matplotlib reads ``$...$`` in any text as a formula, and a name such as ``$\foo$`` made every
later report fail. Figures are drawn under :func:`plain_text`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import matplotlib

Drawing = TypeVar("Drawing", bound=Callable)
PLAIN_TEXT = {"text.parse_math": False}


def plain_text(draw: Drawing) -> Drawing:
    """Wrap a function that draws (and saves) figures so every text in them is taken literally."""

    @functools.wraps(draw)
    def drawing(*args, **kwargs):
        with matplotlib.rc_context(PLAIN_TEXT):
            return draw(*args, **kwargs)

    return drawing  # type: ignore[return-value]
