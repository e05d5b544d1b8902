"""Atlas format 1 -> 2: the drift history.

Format 1 atlases (written before drift tracking) have no drift rows. Every version's
embeddings are stored, so the drift history can be computed exactly as an ingest would have
recorded it. Format 2 kept it in ``drift.duckdb``; since format 5 each version keeps its own
rows in its directory, and the format 4 -> 5 step (``m0004``) computes the rows of every
version that has none, so this step has nothing left to write.
"""

from __future__ import annotations

FROM_VERSION = 1
TO_VERSION = 2
