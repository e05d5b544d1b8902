"""Atlas format 8 -> 9: batch mixing measured among version 1's cells.

From format 9 each version's ``batch_drift`` rows hold ``ilisi_first_version_mean``: the iLISI
of version 1's cells with only version 1's cells as neighbours, sampled as version 1 sampled
them (drift schema migration ``002``). Format 8 had only ``ilisi_mean``, whose neighbours
include the cells of batches that joined later, so two first batches that separated while a
later batch mixed with each could read as mixed.

This step computes the new column for every version from what it needs only: the stored
embeddings of version 1's cells (the first rows of each version's ``latent.npy``, memory-mapped)
and the cells' batch and ``version_added``. Each version's new
``batch_drift`` part is written beside the old one under a new name
(``drift/format9/batch_drift.parquet``) and recorded in the new manifest; the old part is
deleted once that manifest is committed, so a crash mid-upgrade leaves every committed file of
format 8 as it was. Every other drift part, and every figure already stored, stays as it was.
A version whose embeddings, cells or ``batch_drift`` part fail their checksums keeps its part
as it is (a warning names the file): the check then reads ``ilisi_mean`` for it, and a damaged
part is recomputed when read, as in any format. An engine of format 8 refuses a format-9 atlas
by its format number instead of failing on the column it does not know.
"""

from __future__ import annotations

import logging

FROM_VERSION = 8
TO_VERSION = 9
COLUMN = "ilisi_first_version_mean"
TABLE = "batch_drift"
TAG = "format9"
log = logging.getLogger("atlasengine")


def upgrade_files(reader, root):
    """Write every version's ``batch_drift`` part with the new column beside the old; return the manifest."""
    import numpy as np

    from atlasengine.api.audit import drift_parts
    from atlasengine.drift import DriftStore, first_version_mixing
    from atlasengine.errors import AtlasIntegrityError
    from atlasengine.store.version import DRIFT_DIR, LATENT

    manifest, versions = reader.manifest, []
    n_first = sum(d.n_cells for d in manifest.datasets if d.version == 1)  # the first rows of every version
    for info in manifest.versions:
        try:
            cells = reader.cell_obs()[["batch", "version_added"]].iloc[:n_first]
            z = np.load(reader.file(LATENT, info.number), mmap_mode="r", allow_pickle=False)
            if z.ndim != 2 or z.shape[0] != info.n_cells:
                raise AtlasIntegrityError(f"file {info.files[LATENT].path} holds {z.shape[0] if z.ndim else 0} rows "
                                          f"for the {info.n_cells} cells of version {info.number}")
            mixing = first_version_mixing(np.asarray(z[:n_first]), cells, manifest.config.drift)  # only those read
            parts = drift_parts(reader, info, (TABLE,))
        except AtlasIntegrityError as exc:
            log.warning("%s: version %d keeps its batch_drift rows without %s (its batch-mixing check reads "
                        "ilisi_mean)", exc, info.number, COLUMN)
            versions.append(info)
            continue
        staged = reader.store.stage()
        with DriftStore() as db:
            db.load_parts(parts)
            db.con.register("_new", mixing.rename_axis("batch").reset_index().astype({COLUMN: "Float64"}))
            db.con.execute(f"UPDATE {TABLE} SET {COLUMN} = _new.{COLUMN} FROM _new "
                           f"WHERE {TABLE}.batch = _new.batch AND {TABLE}.version = ?", [info.number])
            db.con.unregister("_new")
            db.save_version(info.number, staged / DRIFT_DIR, tables=(TABLE,))
        versions.append(reader.store.add_files(staged, info, TAG))
    return manifest.model_copy(update={"versions": versions})
