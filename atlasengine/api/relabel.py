"""Naming cells: a new version that changes labels only.

``relabel`` gives a set of atlas cells a (new or existing) cell-type name and commits it as the
next version through the same path as an ingest (:mod:`atlasengine.api.foldin`): under the
kernel-held write lock, staged, published, and committed by the manifest switch only if no other
writer committed meanwhile. Nothing is trained: the checkpoint (weights, accumulated Fisher,
anchor) and the embeddings are the parent's, copied byte for byte. The labels go to the version's
``labels.parquet`` (every override so far, see :mod:`atlasengine.store.labels`) and are applied
by the read side over the checksummed labels in the cell store; the neighbour index and the
novelty calibration are rebuilt from the new labels, so the next query's cells of that type are
labelled with it. The version's drift rows say that no cell moved (displacement 0 against its
parent), measured with the new labels.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlasengine.api.audit import drift_rows, write_drift
from atlasengine.api.foldin import publish_and_commit, start_writing, tidy
from atlasengine.api.inputs import MAX_NAME_LENGTH, check_label_name
from atlasengine.api.selection import CellSelection, select_cells
from atlasengine.errors import AtlasConflictError, InputError
from atlasengine.store.atlas_store import AtlasStore
from atlasengine.store.cells import joinids_of
from atlasengine.store.labels import merge_overrides
from atlasengine.store.lock import WriteLock
from atlasengine.store.manifest import Manifest, RelabelRecord, VersionInfo
from atlasengine.store.version import DRIFT_DIR, RelabelFiles, VersionReader, write_relabel_files
from atlasengine.transfer import NeighborIndex
from atlasengine.transfer.novelty import NoveltyCalibration
from atlasengine.transfer.predict import calibrate

log = logging.getLogger("atlasengine")


@dataclass
class Relabelled:
    """A relabel version just committed: the new manifest, its record and what was computed for it."""

    store: AtlasStore
    manifest: Manifest
    info: VersionInfo
    cell_obs: pd.DataFrame
    latent: np.ndarray
    index: NeighborIndex
    calibration: NoveltyCalibration

    def reader(self) -> VersionReader:
        """Return a reader of the new version that holds what was computed (nothing is read back)."""
        reader = VersionReader(self.store, self.manifest, self.info.number)
        reader.remember(cell_obs=self.cell_obs, latent=self.latent, index=self.index, calibration=self.calibration)
        return reader


def _record(before: pd.Series, label: str, note: str | None) -> RelabelRecord:
    known = before.dropna().astype(str)
    return RelabelRecord(label=label, n_cells=len(before), from_labels=known.value_counts().sort_index().to_dict(),
                         from_unlabelled=int(before.isna().sum()), note=note)


def _check_note(note: object) -> str | None:
    if note is None:
        return None
    if not isinstance(note, str) or len(note) > MAX_NAME_LENGTH:
        raise InputError(f"note must be a text of at most {MAX_NAME_LENGTH} characters, got {str(note)[:60]!r}")
    return note


def relabel(store: AtlasStore, seen: int, cells: CellSelection, label: str, note: str | None = None) -> Relabelled:
    """Commit the version after ``seen`` in which the selected cells carry ``label``; nothing else changes.

    Parameters
    ----------
    store
        The atlas.
    seen
        The version the caller chose the cells from: if another writer committed since, the
        relabel is refused (:class:`AtlasConflictError`), since a mask or a choice made on
        that version may not fit the newer one.
    cells, label, note
        As :meth:`atlasengine.Atlas.relabel`.

    Returns
    -------
    Relabelled
        The committed version.
    """
    label = check_label_name(label)
    note = _check_note(note)
    with WriteLock(store.root, task="a relabel") as lock:
        manifest, started_from, parent = start_writing(store)
        if parent.number != seen:
            raise AtlasConflictError(
                f"another writer committed version {parent.number} after version {seen}, from which the cells were "
                "chosen; nothing was relabelled: open the atlas again and repeat the relabel on its newest version"
            )
        obs = parent.cell_obs()
        rows = select_cells(obs, cells, parent.number)
        if len(rows) == 0:
            raise InputError("the selection holds no cell: nothing to relabel")
        manifest, started_from, parent = tidy(store, manifest, started_from, parent)
        number = parent.number + 1
        record = _record(obs["label"].iloc[rows], label, note)
        overrides = merge_overrides(parent.label_overrides(), joinids_of(parent.ranges())[rows], obs.index[rows],
                                    label)
        labels = obs["label"].astype(object).to_numpy(copy=True)
        labels[rows] = label
        new_obs = obs.copy()
        new_obs["label"] = labels
        z = parent.latent()
        labelled = new_obs["label"].notna().to_numpy()
        tcfg = manifest.config.transfer
        index = NeighborIndex.build(z[labelled], new_obs["label"][labelled].astype(str).to_numpy(), tcfg)
        calibration = calibrate(index, z[labelled], tcfg, new_obs["batch"].astype(str).to_numpy()[labelled])
        run_config = {"model": manifest.config.model.model_dump(), "strategy": "relabel",
                      "relabel": record.model_dump()}
        info = VersionInfo(
            number=number, strategy="relabel", parent=parent.number, datasets=list(parent.info.datasets),
            n_cells=parent.info.n_cells, n_new_cells=0, batches=list(parent.info.batches),
            labels=sorted(set(new_obs["label"][labelled].astype(str))), fisher=dict(parent.info.fisher),
            relabel=record,
        )
        staged = store.stage()
        try:
            write_relabel_files(staged, number, parent, RelabelFiles(overrides, index, calibration, run_config))
            drift = drift_rows(info, run_config, new_obs[["batch", "label", "dataset", "version_added"]], z,
                               parent.latent(), parent.first_latent(), manifest.config.drift, None)
            write_drift(staged / DRIFT_DIR, drift, number)
            final, info = publish_and_commit(store, manifest, staged, info, started_from, lock)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    log.info("version %d: %d cell(s) relabelled %r", number, record.n_cells, label)
    return Relabelled(store, final, info, new_obs, z, index, calibration)
