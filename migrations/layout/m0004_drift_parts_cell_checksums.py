"""Atlas format 4 -> 5: drift rows as Parquet parts in each version's directory; checksums of every cell.

Format 4 kept the drift rows of every version in one DuckDB file beside the versions,
``drift.duckdb``: a reader holding it open made every ingest fail, and a deleted file was
silently recreated empty. Format 5 stores each version's rows as
``versions/vNNNN/drift/<table>.parquet``, checksummed in the manifest like the version's other
files and loaded into an in-memory database when read. This step copies each version's rows
out of ``drift.duckdb`` as they are; where the database is missing, unreadable or lacks the
version, the rows are recomputed from the stored embeddings. ``drift.duckdb`` is deleted once
the new manifest is committed.

Format 5 also keeps, with each version, the checksums of the obs and counts of the cells it
added (``cell_checksums.npy``), checked whenever cells are read. Cells written by format 4 had
none: this step computes them from the cells as they are now.

Format 5 removes only folders its staging marked. Leftovers of failed format-4 attempts carry
no mark, so this step removes them as the format-4 engine would have: ``versions/vNNNN``
folders the manifest does not list, and the folders in ``.staging``.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

FROM_VERSION = 4
TO_VERSION = 5
OLD_DATABASE = "drift.duckdb"
REMOVE_AFTER_COMMIT = (OLD_DATABASE, OLD_DATABASE + ".wal")
_STAGED = re.compile(r"^[0-9a-f]{32}$")
_VERSION = re.compile(r"^v\d{4}$")
log = logging.getLogger("atlasengine")


def remove_format4_leftovers(manifest, root: Path) -> None:
    """Delete what failed format-4 ingests left: unlisted ``versions/vNNNN`` folders and staged folders."""
    known = {f"v{v.number:04d}" for v in manifest.versions}
    for folder, pattern in ((root / "versions", _VERSION), (root / ".staging", _STAGED)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for d in folder.iterdir():
            if pattern.match(d.name) and d.name not in known and d.is_dir() and not d.is_symlink():
                shutil.rmtree(d)


def _install(store, staged: Path, info):
    """Move the staged files into ``info``'s version: in place where format 4 listed none of them, beside otherwise.

    A real format-4 atlas lists neither its cell checksums nor drift parts, so nothing it
    commits is replaced. A manifest that says format 4 of a later atlas (edited by hand) lists
    them: the new files then go beside the committed ones, which stay as they are if the
    upgrade fails.
    """
    listed = [key for key in _relative_keys(staged) if key in info.files]
    return store.add_files(staged, info, "format5") if listed else store.replace_files(staged, info)


def _relative_keys(staged: Path) -> list[str]:
    return [f.relative_to(staged).as_posix() for f in staged.rglob("*") if f.is_file()]


def old_rows(path: Path, tables: tuple[str, ...]) -> dict[int, dict]:
    """Rows of each version stored in a format-4 ``drift.duckdb`` (empty when it is missing or unreadable)."""
    import duckdb

    if not path.exists():
        return {}
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            numbers = [r[0] for r in con.execute("SELECT version FROM versions").fetchall()]
            return {v: {t: con.sql(f"SELECT * FROM {t} WHERE version = {int(v)}").to_arrow_table() for t in tables}
                    for v in numbers}
    except (duckdb.Error, OSError) as exc:
        log.warning("%s cannot be read (%s): every version's drift rows are recomputed", path, exc)
        return {}


def record_cell_checksums(reader):
    """Write each version's ``cell_checksums.npy`` from its cells as stored; return a reader of the new manifest."""
    import numpy as np

    from atlasengine.store.version import CELL_CHECKSUMS, VersionReader

    manifest, versions = reader.manifest, []
    for info in manifest.versions:
        added = [(d.joinid_start, d.joinid_stop) for d in manifest.datasets if d.version == info.number]
        staged = reader.store.stage()
        np.save(staged / CELL_CHECKSUMS, reader.store.cells.checksums_of(added, manifest.n_genes), allow_pickle=False)
        versions.append(_install(reader.store, staged, info))
    return VersionReader(reader.store, manifest.model_copy(update={"versions": versions}))


def upgrade_files(reader, root: Path):
    """Write every version's drift parts (copied from ``drift.duckdb``, else recomputed); return the manifest."""
    from atlasengine.api.audit import stored_drift_rows, write_drift
    from atlasengine.drift import VERSIONED_TABLES, DriftStore
    from atlasengine.store.version import DRIFT_DIR

    remove_format4_leftovers(reader.manifest, root)
    reader = record_cell_checksums(reader)
    stored = old_rows(root / OLD_DATABASE, VERSIONED_TABLES)
    versions = []
    for info in reader.manifest.versions:
        staged = reader.store.stage()
        if info.number in stored:
            with DriftStore() as db:
                for table, rows in stored[info.number].items():
                    db.insert(table, rows, f"{OLD_DATABASE} ({table})")
                db.save_version(info.number, staged / DRIFT_DIR)
        else:
            log.warning("version %d has no rows in %s: its drift is recomputed from its embeddings", info.number,
                        OLD_DATABASE)
            write_drift(staged / DRIFT_DIR, stored_drift_rows(reader, info), info.number)
        versions.append(_install(reader.store, staged, info))
    return reader.manifest.model_copy(update={"versions": versions})
