"""One committed version of an atlas: the files that hold it, read lazily, written once.

:class:`VersionReader` is the read side every other part uses (the ``Atlas`` API, the audit
report, the layout migrations): obs of every cell, embeddings under this or an earlier version,
predictions, the checkpoint, the neighbour index and the novelty calibration. Each file is
checked against the manifest's size and SHA-256 the first time it is read.

:func:`write_version_files` is the write side: a new version's files are written into a folder
under ``.staging``, which is then checksummed and renamed into ``versions/vNNNN`` (not yet
committed: the manifest switch is the commit, see :mod:`atlasengine.store.atlas_store`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasengine.errors import AtlasFormatError, AtlasIntegrityError, AtlasWriteError
from atlasengine.faults import fault_point
from atlasengine.store.atlas_store import AtlasStore
from atlasengine.store.cells import CellChecks, joinids_of
from atlasengine.store.checkpoint import load_checkpoint, save_checkpoint
from atlasengine.store.files import sha256_file
from atlasengine.store.labels import LABELS, empty_overrides, read_label_overrides, write_label_overrides
from atlasengine.store.manifest import MANIFEST_NAME, Manifest, VersionInfo
from atlasengine.store.metadata import metadata_frame
from atlasengine.transfer.index import NeighborIndex
from atlasengine.transfer.novelty import CALIBRATION_FILE, NoveltyCalibration

CHECKPOINT = "model.safetensors"
CONFIG = "config.json"
LATENT = "latent.npy"
PREDICTIONS = "predictions.parquet"
CELL_CHECKSUMS = "cell_checksums.npy"
"""``(n, 3)`` uint64 checksums of the obs, counts and own obs columns of the cells this version added, as written."""
INDEX_DIR = "index"
DRIFT_DIR = "drift"
"""The version's drift rows, one Parquet part per table (written by ``atlasengine.api.audit``)."""
PREDICTION_COLUMNS = ("predicted_label", "uncertainty", "is_unknown", "novelty", "novelty_pvalue", "is_novel")

Tensors = dict[str, torch.Tensor]


PER_CELL_MEAN = "per_cell_mean"
SUM_OF_VERSION_MEANS = "sum_of_version_means"  # what format <= 3 stored (see migrations/layout/m0003)


@dataclass(frozen=True)
class Checkpoint:
    """A version's model weights, its accumulated diagonal Fisher and the anchor weights.

    ``fisher`` is a per-cell mean over the ``fisher_cells`` cells it represents (its evidence).
    """

    weights: Tensors
    fisher: Tensors
    anchor: Tensors
    fisher_cells: float


@dataclass
class VersionFiles:
    """Everything a new version writes beside the manifest record."""

    checkpoint: Checkpoint
    latent: np.ndarray
    run_config: dict[str, Any]
    index: NeighborIndex
    calibration: NoveltyCalibration
    cell_checksums: np.ndarray
    predictions: pd.DataFrame | None = None


def write_version_files(staged: Path, number: int, files: VersionFiles) -> None:
    """Write the files of version ``number`` into the staged folder ``staged``.

    The folder is published and committed by the caller; until the manifest lists it, readers
    never look at it, and the next writer removes it if the commit never comes.
    """
    try:
        _write_files(staged, number, files)
    except OSError as exc:  # disk full, quota, permissions
        raise AtlasWriteError(f"cannot write the files of version {number} in {staged}: {exc}; "
                              "nothing was committed") from exc


def _write_files(staged: Path, number: int, files: VersionFiles) -> None:
    fault_point("checkpoint")
    ck = files.checkpoint
    header = {"fisher_kind": PER_CELL_MEAN, "fisher_cells": repr(float(ck.fisher_cells)), "fisher_version": str(number)}
    save_checkpoint(staged / CHECKPOINT, ck.weights, ck.fisher, ck.anchor, header)
    fault_point("checkpoint_written")
    np.save(staged / LATENT, files.latent.astype(np.float32, copy=False), allow_pickle=False)
    (staged / CONFIG).write_text(json.dumps(files.run_config, indent=2))
    files.index.save(staged / INDEX_DIR)
    files.calibration.save(staged / CALIBRATION_FILE)
    np.save(staged / CELL_CHECKSUMS, files.cell_checksums.astype(np.uint64, copy=False), allow_pickle=False)
    if files.predictions is not None:
        files.predictions.to_parquet(staged / PREDICTIONS)


@dataclass
class RelabelFiles:
    """What a relabel version writes: its label overrides, and the index and calibration built on them."""

    overrides: pd.DataFrame
    """Every override up to the new version (index ``soma_joinid``; ``cell``, ``label``)."""
    index: NeighborIndex
    calibration: NoveltyCalibration
    run_config: dict[str, Any]


def write_relabel_files(staged: Path, number: int, parent: VersionReader, files: RelabelFiles) -> None:
    """Write the files of relabel version ``number`` into ``staged``: the parent's model and embeddings, new labels.

    The checkpoint (weights, accumulated Fisher, anchor) and the embeddings are byte-for-byte
    copies of the parent's, checked against its checksums as copied; the version adds no cells
    (its cell checksum file has no rows).
    """
    try:
        fault_point("checkpoint")
        for key in (CHECKPOINT, LATENT):
            shutil.copyfile(parent.file(key), staged / key)
            record = parent.info.files[key]
            if sha256_file(staged / key) != record.sha256:  # the parent's check may date from when it was opened
                raise AtlasIntegrityError(f"file {record.path} of version {parent.number} does not match its checksum "
                                          "(corrupted since the atlas was opened); nothing was committed")
        (staged / CONFIG).write_text(json.dumps(files.run_config, indent=2))
        files.index.save(staged / INDEX_DIR)
        files.calibration.save(staged / CALIBRATION_FILE)
        np.save(staged / CELL_CHECKSUMS, np.zeros((0, 3), dtype=np.uint64), allow_pickle=False)
        ov = files.overrides
        write_label_overrides(staged / LABELS, ov.index.to_numpy(), ov["cell"].tolist(), ov["label"].tolist())
    except OSError as exc:
        raise AtlasWriteError(f"cannot write the files of version {number} in {staged}: {exc}; "
                              "nothing was committed") from exc


class VersionReader:
    """Read one committed version of the atlas at ``store`` (and the versions before it).

    Parameters
    ----------
    store
        The atlas directory.
    manifest
        A manifest that lists version ``number``.
    number
        The version to read (default: the manifest's newest).
    """

    def __init__(self, store: AtlasStore, manifest: Manifest, number: int | None = None) -> None:
        number = manifest.current if number is None else number
        manifest.version(number)  # raises for an unknown version
        self.store = store
        self.manifest = manifest.truncated(number)
        self.number = number
        self._cache: dict[Any, Any] = {}

    @property
    def info(self) -> VersionInfo:
        """The manifest record of this version."""
        return self.manifest.version(self.number)

    def remember(
        self,
        *,
        cell_obs: pd.DataFrame | None = None,
        latent: np.ndarray | None = None,
        index: NeighborIndex | None = None,
        calibration: NoveltyCalibration | None = None,
        predictions: pd.DataFrame | None = None,
        genes: list[str] | None = None,
    ) -> None:
        """Keep what this process just computed and wrote for this version, so it is not read back from disk.

        The writer of a version hands it to the reader of it.
        """
        values = {"cell_obs": cell_obs, ("latent", self.number): latent, "index": index,
                  "stored_calibration": calibration, ("predictions", self.number): predictions, "genes": genes}
        self._cache.update({k: v for k, v in values.items() if v is not None})

    def _cached(self, key: Any, load: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def file(self, key: str, number: int | None = None) -> Path:
        """Path of a file of this (or an earlier) version, verified against its checksum."""
        return self.store.file(self.manifest.version(self.number if number is None else number), key)

    def verify(self) -> None:
        """Check every file of this version but its drift parts; raise naming the first bad one.

        Drift parts are checked when read: a bad one is recomputed from the embeddings.
        """
        self.store.verify(self.info, skip=(DRIFT_DIR + "/",))

    # ------------------------------------------------------------------ cells
    def genes(self) -> list[str]:
        """Return the atlas's genes, in the order of the model's input (a copy).

        Their number is checked against the manifest's ``n_genes`` (:class:`AtlasIntegrityError`).
        """
        genes = self._cached("genes", self.store.cells.genes)
        if len(genes) != self.manifest.n_genes:
            raise AtlasIntegrityError(f"the cell store holds {len(genes)} genes where the manifest records "
                                      f"{self.manifest.n_genes}: the cell store or {MANIFEST_NAME} is damaged")
        return list(genes)

    def gene_annotations(self) -> pd.DataFrame:
        """Return the reference's own gene columns (e.g. ``gene_symbol``), indexed by the atlas's genes."""
        return self._cached("gene_annotations", self.store.cells.gene_annotations).copy()

    def ranges(self, number: int | None = None) -> list[tuple[int, int]]:
        """Joinid ranges of the cells of version ``number`` (default: this one), in atlas order."""
        n = self.number if number is None else number
        return [(d.joinid_start, d.joinid_stop) for d in self.manifest.datasets_until(n)]

    def label_overrides(self) -> pd.DataFrame:
        """Labels that relabel versions up to this one gave (index ``soma_joinid``; ``cell``, ``label``).

        Read from the newest version at or before this one that has a ``labels.parquet`` (each
        holds every override before it); empty when none has.
        """

        def load() -> pd.DataFrame:
            for info in reversed(self.manifest.versions):
                if LABELS in info.files:
                    return read_label_overrides(self.file(LABELS, info.number))
            return empty_overrides()

        return self._cached("label_overrides", load).copy()

    def cell_obs(self) -> pd.DataFrame:
        """Read the cell store's obs of every cell of this version (index: cell name), its labels as of this version.

        The obs are checked against the cells' checksums as stored; then the labels relabel
        versions gave (:meth:`label_overrides`) replace the stored ones.
        """

        def load() -> pd.DataFrame:
            df = self.store.cells.read_obs(self.ranges())
            self.cell_checks().verify(df.index.to_numpy(), obs=df)
            overrides = self.label_overrides()
            if len(overrides):
                at = df.index.get_indexer(overrides.index)
                names = df["obs_id"].to_numpy()[np.maximum(at, 0)]
                if (at < 0).any() or (names != overrides["cell"].to_numpy()).any():
                    raise AtlasIntegrityError(f"the label overrides of version {self.number} name cells that are not "
                                              "the atlas's (a damaged labels.parquet)")
                label = df["label"].astype(object).to_numpy(copy=True)
                label[at] = overrides["label"].to_numpy()
                df["label"] = label
            df = df.reset_index(drop=True).set_index("obs_id")
            df.index.name = "cell"
            return df

        return self._cached("cell_obs", load)

    def cell_metadata(self) -> pd.DataFrame:
        """Read the own obs columns of every cell of this version (index: cell name), checked against their checksums.

        One column per column any dataset brought (see :mod:`atlasengine.store.metadata` for
        the dtypes); cells of a dataset without it read it as missing.
        """

        def load() -> pd.DataFrame:
            columns = self.manifest.obs_columns(self.number)
            parts = []
            for d in self.manifest.datasets_until(self.number):
                table = None
                if d.obs_columns:
                    table = self.store.cells.read_metadata(d.joinid_start, d.joinid_stop)
                    self.cell_checks().verify_metadata(d.joinid_start, d.joinid_stop, table, list(d.obs_columns))
                parts.append(metadata_frame(table, columns, d.n_cells))
            df = pd.concat(parts, ignore_index=True) if parts else metadata_frame(None, columns, 0)
            df.index = self.cell_obs().index
            return df

        return self._cached("cell_metadata", load)

    def obs(self) -> pd.DataFrame:
        """Every cell with the predictions of the version that added it and its own obs columns (a copy).

        Columns: dataset, batch, label (None when unlabelled), version_added, for ingested
        cells ``predicted_label``, ``uncertainty``, ``is_unknown``, ``novelty``,
        ``novelty_pvalue`` and ``is_novel`` (the two flags of dtype ``boolean``), then the obs columns the user's datasets brought
        (:meth:`cell_metadata`).
        """

        def load() -> pd.DataFrame:
            df = self.cell_obs().copy()
            df["label"] = df["label"].astype(object).where(df["label"].notna(), None)
            for col in PREDICTION_COLUMNS:
                df[col] = np.nan if col in ("uncertainty", "novelty", "novelty_pvalue") else None
            parts = [self.predictions(v.number) for v in self.manifest.versions if v.number > 1]
            parts = [p for p in parts if p is not None]
            if parts:
                p = pd.concat(parts)
                common = df.index.intersection(p.index)
                for col in PREDICTION_COLUMNS:
                    if col in p.columns:  # versions written before novelty scores lack them
                        df.loc[common, col] = p.loc[common, col].to_numpy()
            for col in ("is_unknown", "is_novel"):  # missing for the reference's cells, as the user's booleans
                df[col] = df[col].astype("boolean")
            return pd.concat([df, self.cell_metadata()], axis=1)

        return self._cached("obs", load).copy()

    def counts(self, rows: np.ndarray | None = None) -> sp.csr_matrix:
        """Raw counts of every cell of this version (CSR, cells x genes, rows aligned to :meth:`obs`).

        ``rows``: positions in :meth:`obs` to read instead of every cell (in that order, repeats
        allowed); only those cells are read and checked.
        """
        ids = joinids_of(self.ranges())
        if rows is None:
            counts = self.store.cells.read_counts(ids, self.manifest.n_genes)
            self.cell_checks().verify(ids, counts=counts)
            return counts
        distinct, where = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        counts = self.store.cells.read_counts(ids[distinct], self.manifest.n_genes)
        self.cell_checks().verify(ids[distinct], counts=counts)
        return counts[where]

    def cell_checks(self) -> CellChecks:
        """Return the checksums written with every cell of this version, to check cells read from the store."""
        return self._cached("cell_checks", self._load_cell_checks)

    def _load_cell_checks(self) -> CellChecks:
        datasets = self.manifest.datasets_until(self.number)
        parts = []
        for number in sorted({d.version for d in datasets}):
            values = np.load(self.file(CELL_CHECKSUMS, number), allow_pickle=False)
            expected = sum(d.n_cells for d in datasets if d.version == number)
            if values.shape != (expected, 3) or values.dtype != np.uint64:
                raise AtlasIntegrityError(f"file {self.manifest.version(number).files[CELL_CHECKSUMS].path} holds "
                                          f"{values.shape} {values.dtype} checksums, not ({expected}, 3) uint64")
            parts.append(values)
        ranges = [(d.joinid_start, d.joinid_stop, d.name) for d in datasets]
        return CellChecks(ranges, np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.uint64))

    # -------------------------------------------------------------- embeddings
    def latent(self, number: int | None = None) -> np.ndarray:
        """Embeddings of all cells of version ``number`` (default: this one) under its model (a copy)."""
        n = self.number if number is None else number
        return self._cached(("latent", n), lambda: self._load_latent(n)).copy()

    def _load_latent(self, number: int) -> np.ndarray:
        """Load a version's embeddings, checked to hold one row per cell the manifest records."""
        info = self.manifest.version(number)
        path = self.file(LATENT, number)
        z = np.load(path, allow_pickle=False)
        in_datasets = sum(d.n_cells for d in self.manifest.datasets_until(number))
        if z.ndim != 2 or z.shape[0] != info.n_cells or in_datasets != info.n_cells:
            raise AtlasIntegrityError(
                f"file {info.files[LATENT].path} of version {number} holds {z.shape[0] if z.ndim else 0} rows; the "
                f"manifest records {info.n_cells} cells for the version and {in_datasets} in its datasets"
            )
        return z

    def first_latent(self, number: int | None = None) -> np.ndarray:
        """Each cell of version ``number`` (default: this one) embedded by the version that added it."""
        n = self.number if number is None else number
        parts = []
        for version in sorted({d.version for d in self.manifest.datasets_until(n)}):
            before = sum(d.n_cells for d in self.manifest.datasets_until(version - 1))
            parts.append(self.latent(version)[before:])
        return np.concatenate(parts)

    # ------------------------------------------------------------------ files
    def predictions(self, number: int | None = None) -> pd.DataFrame | None:
        """Predictions for the cells version ``number`` added (a copy; None for the reference)."""
        info = self.manifest.version(self.number if number is None else number)
        if PREDICTIONS not in info.files:
            return None
        return self._cached(("predictions", info.number),
                            lambda: pd.read_parquet(self.file(PREDICTIONS, info.number))).copy()

    def run_config(self, number: int | None = None) -> dict[str, Any]:
        """Read the settings the version was made with (its ``config.json``)."""
        n = self.number if number is None else number
        return json.loads(self.file(CONFIG, n).read_text(encoding="utf-8"))

    def checkpoint(self) -> Checkpoint:
        """Weights, accumulated Fisher (a per-cell mean, with the cells it represents) and anchor weights."""
        path = self.file(CHECKPOINT)
        weights, fisher, anchor, header = load_checkpoint(path)
        record = self.info.fisher
        kind = header.get("fisher_kind") or record.get("kind")
        if kind == PER_CELL_MEAN:
            cells = float(header.get("fisher_cells", record.get("represented_cells", "nan")))
        elif kind == SUM_OF_VERSION_MEANS:
            n_means = float(record["n_means"])
            fisher = {k: v / n_means for k, v in fisher.items()}
            cells = float(record["represented_cells"])
        else:
            raise AtlasFormatError(f"checkpoint {path} does not say what its Fisher represents (kind {kind!r})")
        if not np.isfinite(cells) or cells < 0:
            raise AtlasFormatError(f"checkpoint {path} records {cells} cells behind its Fisher")
        return Checkpoint(weights, fisher, anchor, cells)

    def index(self) -> NeighborIndex:
        """Load the faiss index over this version's labelled cells."""

        def load() -> NeighborIndex:
            folders = {self.file(key).parent for key in self.info.files if key.startswith(INDEX_DIR + "/")}  # verified
            if len(folders) != 1:
                raise AtlasIntegrityError(f"version {self.number} records its index files in {len(folders)} folders, "
                                          "not one")
            return NeighborIndex.load(folders.pop())  # where the manifest says they are (an upgrade may move them)

        return self._cached("index", load)

    def stored_calibration(self) -> NoveltyCalibration | None:
        """Load the novelty calibration stored with this version (None if it was written before them)."""
        if CALIBRATION_FILE not in self.info.files:
            return None
        return self._cached("stored_calibration", lambda: NoveltyCalibration.load(self.file(CALIBRATION_FILE)))
