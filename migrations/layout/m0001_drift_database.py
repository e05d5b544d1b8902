"""Atlas format 1 -> 2: add the DuckDB drift database.

Format 1 atlases (written before drift tracking) have no ``drift.duckdb``. Every version's
embeddings are stored, so the drift history is computed now, version by version, exactly as
an ingest would have recorded it, into a new database that replaces any half-built one.
"""

from __future__ import annotations

from pathlib import Path

FROM_VERSION = 1
TO_VERSION = 2


def upgrade_files(reader, root: Path) -> None:
    """Compute the drift history of every stored version into ``root/drift.duckdb``."""
    from atlasengine.api.audit import backfill_drift

    target = root / "drift.duckdb"
    tmp = root / ".drift.duckdb.upgrade"
    for leftover in (tmp, Path(str(tmp) + ".wal")):
        leftover.unlink(missing_ok=True)
    backfill_drift(reader, tmp)
    tmp.replace(target)
