"""Atlas format 5 -> 6: every obs column of the user's data is kept.

Up to format 5 the cell store kept five columns of each cell (its name, dataset, batch, label
and the version that added it) and dropped the rest of the AnnData's obs: a case-control study
could not ask which disease cells were called Unknown. Format 6 keeps every obs column: each
dataset's own columns are a table of their own in the cell store
(``cells/obs_columns/joinids_<start>_<stop>``), the manifest records each dataset's columns and
their kind (``obs_columns``), and each cell's third checksum covers them (``cell_checksums.npy``
has three columns).

Cells written by format 5 brought no columns beyond the engine's: this step records that
(``obs_columns: {}`` for every dataset) and gives each version's ``cell_checksums.npy`` its third
column, 0 (the checksum of no columns), written beside the old file until the upgraded manifest
is committed. Nothing of the cells themselves changes.
"""

from __future__ import annotations

from pathlib import Path

FROM_VERSION = 5
TO_VERSION = 6


def upgrade_manifest(raw: dict) -> dict:
    """Record that every dataset of a format-5 atlas brought no obs columns of its own."""
    datasets = [{**record, "obs_columns": dict(record.get("obs_columns") or {})} for record in raw.get("datasets", [])]
    return {**raw, "datasets": datasets}


def _sha256_as_saved(values) -> str:
    """SHA-256 of the bytes ``np.save`` writes for ``values`` (what format 5 wrote)."""
    import hashlib
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(values), allow_pickle=False)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def upgrade_files(reader, root: Path):
    """Give every version's two-column ``cell_checksums.npy`` its third column (0: no own obs columns).

    The padded file is written beside the old one (``format6/cell_checksums.npy``, recorded by
    path in the new manifest); the old one is deleted once that manifest is committed, so an
    upgrade that dies leaves every file of format 5 as it was. A file an interrupted upgrade of an
    earlier engine padded in place is taken when its first two columns are the file the manifest
    records, byte for byte; anything else is refused as damaged.
    """
    import numpy as np

    from atlasengine.errors import AtlasIntegrityError
    from atlasengine.store.files import sha256_file
    from atlasengine.store.version import CELL_CHECKSUMS

    manifest, versions = reader.manifest, []
    for info in manifest.versions:
        record = info.files[CELL_CHECKSUMS]
        path = reader.store.file(info, CELL_CHECKSUMS, verify=False)
        values = np.load(path, allow_pickle=False)
        if values.ndim == 2 and values.shape[1] == 3 and sha256_file(path) == record.sha256:
            versions.append(info)  # recorded with three columns already (by the format 4 -> 5 step of this upgrade)
            continue
        two = values[:, :2] if values.ndim == 2 and values.shape[1] == 3 and not values[:, 2].any() else values
        # the file as recorded, or (after an interrupted upgrade padded it in place) its first two
        # columns as numpy saves them; the file's own hash first, so another numpy's header is no damage
        sound = values.ndim == 2 and values.shape[1] == 2 and sha256_file(path) == record.sha256
        if not sound and (values.ndim != 2 or two.shape[1] != 2 or _sha256_as_saved(two) != record.sha256):
            raise AtlasIntegrityError(f"file {record.path} is not the cell checksums the manifest records (damaged)")
        staged = reader.store.stage()
        np.save(staged / CELL_CHECKSUMS, np.column_stack([two, np.zeros(len(two), dtype=np.uint64)]).astype(np.uint64),
                allow_pickle=False)
        versions.append(reader.store.add_files(staged, info, "format6"))  # beside the old file until the commit
    return manifest.model_copy(update={"versions": versions})
