"""The ``Atlas``: a versioned reference that folds in queries with online EWC.

The class is the thin user API: reading goes through :class:`~atlasengine.store.version.VersionReader`,
writing through :mod:`atlasengine.api.foldin`, label transfer through
:mod:`atlasengine.transfer.predict`, drift and the report through :mod:`atlasengine.api.audit`.

Example
-------
>>> import anndata as ad
>>> from atlasengine import Atlas
>>> data = ad.read_h5ad("../shared/data/pancreas_panc8_small.h5ad")
>>> ref, query = data[data.obs.tech != "smartseq2"].copy(), data[data.obs.tech == "smartseq2"].copy()
>>> tiny = {"model": {"n_hidden": 16}, "reference_training": {"max_epochs": 3},
...         "query_training": {"max_epochs": 2}}
>>> atlas = Atlas.create(getfixture("tmp_path") / "p.atlas", ref, batch_key="tech", label_key="celltype",
...                      config=tiny)
>>> result = atlas.ingest(query, batch_key="tech", strategy="ewc")
>>> atlas.version, result.predictions.shape[0], Atlas.open(atlas.path, version=1).latent().shape
(2, 100, (400, 10))
"""

from __future__ import annotations

import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from pydantic import ValidationError

from atlasengine.api import foldin
from atlasengine.api.anndata_out import atlas_anndata, query_anndata
from atlasengine.api.audit import drift_store, query_atlas, render_atlas_report
from atlasengine.api.groups import unknown_groups
from atlasengine.api.inputs import prepare_input
from atlasengine.api.relabel import CellSelection, relabel
from atlasengine.api.sources import SomaInput, as_input
from atlasengine.api.upgrade import upgrade_atlas
from atlasengine.config import (
    STRATEGIES,
    AtlasConfig,
    ContinualConfig,
    FoldInStrategy,
    ModelConfig,
    RuntimeConfig,
    TrainingConfig,
    TransferConfig,
    merged,
    validation_problems,
)
from atlasengine.drift import Report
from atlasengine.errors import AtlasFormatError, AtlasLockedError, InputError, ReadOnlyError
from atlasengine.model import CVAE
from atlasengine.store.atlas_store import AtlasStore, local_path
from atlasengine.store.cells import CellStore
from atlasengine.store.lock import break_lock, lock_holder
from atlasengine.store.manifest import AtlasNeedsUpgrade, VersionInfo, read_raw_manifest
from atlasengine.store.remote import fetch, is_remote
from atlasengine.store.version import VersionReader
from atlasengine.training import CellData, embed
from atlasengine.transfer import NeighborIndex
from atlasengine.transfer.novelty import NoveltyCalibration
from atlasengine.transfer.predict import calibrate, matches, predict, refuse_index_changes

DRIFT_TABLES = {None: "version_drift", "cell_type": "celltype_drift", "batch": "batch_drift", "flags": "drift_flags",
                "cell": "cell_drift", "versions": "versions"}


def _model_asked_for(config: AtlasConfig | dict | None) -> dict[str, Any]:
    """Return the model settings ``config`` sets explicitly (a dict's keys, or a pydantic model's fields set)."""
    if isinstance(config, AtlasConfig):
        model = config.model if "model" in config.model_fields_set else None
    else:
        model = dict(config or {}).get("model")
    if isinstance(model, ModelConfig):
        return {k: getattr(model, k) for k in model.model_fields_set}
    return dict(model) if isinstance(model, dict) else {}


@dataclass
class IngestResult:
    """What an ingest produced: the new version, label predictions of the new cells, timings."""

    version: VersionInfo
    predictions: pd.DataFrame
    latent: np.ndarray
    training: dict[str, Any]
    genes_padded: int
    genes_dropped: int
    history: list[dict[str, float]] = field(default_factory=list)
    query: ad.AnnData | SomaInput | None = field(default=None, repr=False)
    atlas_path: str = ""

    def __repr__(self) -> str:
        """Return a one-line summary (the version, the cells, the share called Unknown, the training)."""
        p = self.predictions
        unknown = float(p["is_unknown"].mean()) if len(p) else 0.0
        return (f"IngestResult(version={self.version.number}, strategy={self.version.strategy!r}, "
                f"cells={len(p)}, unknown={unknown:.1%}, epochs={self.training.get('epochs')}, "
                f"seconds={self.training.get('seconds', 0.0):.1f}, genes_padded={self.genes_padded}, "
                f"genes_dropped={self.genes_dropped})")

    def to_anndata(self) -> ad.AnnData:
        """Return the folded-in AnnData (a copy) with the predictions in ``obs`` and the embedding in ``obsm``.

        ``obsm["X_atlasengine"]`` holds the embedding (``sc.pp.neighbors(adata,
        use_rep="X_atlasengine")``); ``obs`` gains ``label``, ``predicted_label``,
        ``uncertainty``, ``is_unknown``, the novelty columns and ``p_<label>``.
        """
        if self.query is None:
            raise InputError("this result does not hold the AnnData that was folded in")
        return query_anndata(self.query, self.predictions, self.latent, self.atlas_path, self.version.number)


def _local_atlas(path: str | Path) -> Path:
    """Return ``path`` if it is the folder of an atlas on this machine (the only kind that has a write lock)."""
    if is_remote(str(path)):
        raise InputError(f"{path} is a URL: an atlas published there is read-only and has no write lock; ask about "
                         "the lock of the folder it was published from")
    read_raw_manifest(local_path(path))  # an atlas's manifest, or the error that says why not
    return local_path(path)


def _new_atlas_path(path: str | Path) -> Path:
    """Return ``path`` as a local folder to create an atlas in; a URL of object storage is refused."""
    if is_remote(str(path)):
        raise InputError(f"{path} is a URL: an atlas is written in a folder on a file system and published to object "
                         "storage afterwards by copying the folder (aws s3 sync pancreas.atlas s3://bucket/pancreas.atlas)")
    return local_path(path)


class Atlas:
    """A versioned single-cell reference atlas on disk.

    Create one with :meth:`Atlas.create`, open one with :meth:`Atlas.open`, fold in new data
    with :meth:`ingest`. An atlas opened at an earlier version is read-only.
    """

    def __init__(self, reader: VersionReader, read_only: bool) -> None:
        self._reader = reader
        self._read_only = read_only
        self._calibrations: dict[tuple[int, str, int], NoveltyCalibration] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        adata: ad.AnnData | SomaInput,
        batch_key: str,
        label_key: str,
        *,
        dataset: str = "reference",
        layer: str | None = None,
        config: AtlasConfig | dict | None = None,
        runtime: RuntimeConfig | dict | None = None,
    ) -> Atlas:
        """Train the reference model on ``adata`` and write version 1 of a new atlas at ``path``.

        Parameters
        ----------
        path
            A new (or empty) directory; the atlas appears there only when complete.
        adata
            Raw counts in ``X`` (or ``layer``), cells x genes: an AnnData in memory, a backed one
            (``anndata.read_h5ad(path, backed="r")``) or a :class:`SomaInput`; the last two are
            streamed, their counts never whole in memory (training reads them back from the cell
            store in shuffled blocks of ``runtime.block_cells``).
        batch_key, label_key
            Obs columns of the batch (the model's covariate) and of the cell type.
        dataset
            Name of this dataset in the atlas.
        layer
            The layer holding raw counts, if not ``X``.
        config
            Settings stored with the atlas (a dict changes only the keys it names).
        runtime
            Accelerator, devices and progress display (not stored).

        Returns
        -------
        Atlas
            The new atlas at version 1.
        """
        try:
            cfg = config if isinstance(config, AtlasConfig) else AtlasConfig.model_validate(config or {})
        except ValidationError as exc:
            raise InputError(f"invalid atlas config: {validation_problems(exc, 'AtlasConfig')}") from exc
        committed = foldin.create(_new_atlas_path(path), adata, batch_key=batch_key, label_key=label_key, dataset=dataset,
                                  layer=layer, config=cfg, runtime=merged(RuntimeConfig(), runtime))
        return cls(committed.reader(), read_only=False)

    @classmethod
    def from_scvi(
        cls,
        path: str | Path,
        model_dir: str | Path,
        adata: ad.AnnData,
        label_key: str,
        *,
        dataset: str = "reference",
        layer: str | None = None,
        config: AtlasConfig | dict | None = None,
        runtime: RuntimeConfig | dict | None = None,
    ) -> Atlas:
        """Start an atlas from an scvi-tools ``SCVI`` reference saved with ``model.save``.

        The model's weights become version 1 (no training); the Fisher, embeddings, index and
        calibration are computed on ``adata``, the reference data the model was trained on.
        Embeddings equal scvi-tools' ``get_latent_representation``. Settings the engine cannot
        represent (batch norm, extra covariates, another dispersion, a model class other than
        SCVI) are refused, naming the setting; the checkpoint is read without unpickling code.

        Parameters
        ----------
        path
            A new (or empty) directory for the atlas.
        model_dir
            The folder ``model.save`` wrote (it holds ``model.pt``).
        adata
            The reference cells with raw counts, the model's genes, and the batch column the
            model was set up with.
        label_key
            Obs column of the cell type.
        dataset, layer, config, runtime
            As for :meth:`create`; ``config["model"]`` is taken from the scvi-tools model (a
            different one asked for in ``config`` is refused, naming the setting).

        Returns
        -------
        Atlas
            The new atlas at version 1.
        """
        from atlasengine.api.scvi_import import model_config, origin, read_scvi, to_module

        ref = read_scvi(model_dir)
        if ref.batch_key == "_scvi_batch" and "_scvi_batch" not in adata.obs:
            raise InputError("the scvi-tools model was set up without a batch_key (one batch, which scvi-tools "
                             "writes to adata.obs['_scvi_batch'] as 0): pass the AnnData it was set up with, or set "
                             "adata.obs['_scvi_batch'] = 0")
        module = to_module(ref)
        imported = model_config(ref).model_dump()
        asked = _model_asked_for(config)
        if asked:  # the architecture is the scvi-tools model's: a different one cannot be had
            differ = {k: v for k, v in asked.items() if k in imported and imported[k] != v}
            if differ:
                raise InputError(f"config['model'] asks for {differ}, but an imported reference keeps the scvi-tools "
                                 f"model's architecture ({', '.join(f'{k}={imported[k]!r}' for k in differ)}): leave "
                                 "config['model'] out")
        try:
            base = config.model_dump() if isinstance(config, AtlasConfig) else dict(config or {})
            cfg = AtlasConfig.model_validate({**base, "model": imported})
        except ValidationError as exc:
            raise InputError(f"invalid atlas config: {validation_problems(exc, 'AtlasConfig')}") from exc
        committed = foldin.create(
            _new_atlas_path(path), adata, batch_key=ref.batch_key, label_key=label_key, dataset=dataset, layer=layer, config=cfg,
            runtime=merged(RuntimeConfig(), runtime),
            pretrained=foldin.Pretrained(module, ref.genes, ref.batches, origin(ref, model_dir)),
        )
        return cls(committed.reader(), read_only=False)

    @classmethod
    def open(cls, path: str | Path, version: int | None = None, read_only: bool | None = None,
             storage_options: dict | None = None) -> Atlas:
        """Open an atlas at its newest version, or read-only at an earlier ``version``.

        Parameters
        ----------
        path
            The atlas directory, or the URL of an atlas published on object storage
            (``"s3://bucket/atlas"``), which opens read-only: its cells are read in place
            (TileDB), its version files fetched into a temporary folder (fsspec) and checked.
        version
            A committed version number (default: the newest).
        read_only
            Refuse writes even at the newest version. An atlas of an older format is upgraded
            in place when opened (its files rewritten once); with ``read_only=True`` it is
            refused instead, unchanged.
        storage_options
            For a URL: fsspec's options (``key``, ``secret``, ``endpoint_url``,
            ``client_kwargs``; the S3 ones are given to TileDB too) and ``tiledb_config``.

        Returns
        -------
        Atlas
            The atlas as of ``version``; every file of it checked against its checksum.

        Example
        -------
        An atlas published on S3 (credentials from the environment)::

            atlas = Atlas.open("s3://lab-atlases/lung.atlas")
            predictions = atlas.transfer_labels(my_cells, batch_key="sample")
        """
        if version is not None and (isinstance(version, bool) or not isinstance(version, (int, np.integer))):
            raise InputError(f"version must be a version number (an integer), got {version!r}")
        if is_remote(path):
            local, cells_uri, settings = fetch(str(path), storage_options, None if version is None else int(version))
            store = AtlasStore(local, CellStore(cells_uri, settings), source=str(path))
            try:
                atlas = cls._open_store(store, version, True)
            except BaseException:
                shutil.rmtree(local.parent, ignore_errors=True)
                raise
            weakref.finalize(atlas, shutil.rmtree, str(local.parent), True)  # the fetched files go with the object
            return atlas
        if storage_options:
            raise InputError(f"storage_options are for atlases at a URL (s3://...), not for the folder {path}")
        return cls._open_store(AtlasStore(local_path(path)), version, read_only, upgrade=not read_only)

    @classmethod
    def _open_store(cls, store: AtlasStore, version: int | None, read_only: bool | None, upgrade: bool = True) -> Atlas:
        try:
            manifest = store.read_manifest()
        except AtlasNeedsUpgrade as needs:
            if not upgrade:
                raise ReadOnlyError(f"{needs}; opened with read_only=True, and the upgrade rewrites it in place: a user "
                                    "who can write to it opens it once without read_only (Atlas.open(path), or any "
                                    "atlasengine command) to upgrade it") from needs
            try:
                upgrade_atlas(store.root)
            except ReadOnlyError as exc:
                raise ReadOnlyError(f"{needs}: it is upgraded in place once, by a user who can write to it (Atlas.open "
                                    f"upgrades it), and this one cannot ({exc})") from exc
            except AtlasLockedError as exc:
                try:
                    store.read_manifest()  # the holder may have been upgrading it, and be done
                except AtlasNeedsUpgrade:
                    raise AtlasLockedError(f"{needs}: it is upgraded in place before it opens, and cannot be while "
                                           f"another process writes to it ({exc})") from exc
            manifest = store.read_manifest()
        if not manifest.versions:
            raise AtlasFormatError(f"{store.source} has no committed version")
        reader = VersionReader(store, manifest, None if version is None else int(version))
        reader.verify()
        current = manifest.current
        ro = (reader.number != current) if read_only is None else bool(read_only or reader.number != current)
        return cls(reader, ro)

    @staticmethod
    def break_lock(path: str | Path) -> bool:
        """Refuse to break a write lock a live process holds (:class:`AtlasLockedError`); False when none does.

        The lock is held by the kernel: a writer that died holds nothing, so there is never a
        stale lock to break.
        """
        return break_lock(_local_atlas(path))

    @staticmethod
    def lock_holder(path: str | Path) -> dict | None:
        """Return who holds the write lock (pid, host, since, task), or None when nobody does.

        A path that holds no atlas, or a URL (published atlases are read-only), raises instead of
        reading as "not locked".
        """
        return lock_holder(_local_atlas(path))

    # --------------------------------------------------------------- properties
    @property
    def path(self) -> Path:
        """The atlas directory (for an atlas read from a URL: the local folder of its fetched version files)."""
        return self._reader.store.root

    @property
    def source(self) -> str:
        """Where the atlas lives, as it was opened: its directory or its URL (``s3://...``)."""
        return self._reader.store.source

    @property
    def version(self) -> int:
        """The version this object shows."""
        return self._reader.number

    @property
    def versions(self) -> list[VersionInfo]:
        """Committed versions up to this one, oldest first."""
        return list(self._reader.manifest.versions)

    @property
    def info(self) -> VersionInfo:
        """The manifest record of this version (what made it, its files, Fisher and training)."""
        return self._reader.info

    @property
    def config(self) -> AtlasConfig:
        """The settings stored with the atlas."""
        return self._reader.manifest.config

    def _check_writable(self, what: str) -> None:
        store = self._reader.store
        if store.source != str(store.root):
            raise ReadOnlyError(f"this atlas is read from {store.source}: atlases on object storage are read-only; "
                                f"copy it to a file system to {what} (writing stays on a file system)")
        if self._read_only:
            raise ReadOnlyError(f"this Atlas shows version {self.version} read-only; open the newest version to {what}")

    @property
    def read_only(self) -> bool:
        """Whether writes are refused (an earlier version, or opened read-only)."""
        return self._read_only

    @property
    def genes(self) -> list[str]:
        """The atlas's genes, in the order of the model's input."""
        return self._reader.genes()

    def var(self) -> pd.DataFrame:
        """Return the atlas's genes with the reference AnnData's own gene columns (e.g. ``gene_symbol``).

        Index: the gene names, in the order of the model's input. Atlases made before format 7
        kept no gene columns (an empty frame with the genes as index).
        """
        return self._reader.gene_annotations()

    @property
    def batches(self) -> list[str]:
        """Batch categories known to the model, in the order of its batch input."""
        return list(self.info.batches)

    @property
    def labels(self) -> list[str]:
        """Reference labels known at this version."""
        return list(self.info.labels)

    @property
    def n_cells(self) -> int:
        """Cells in the atlas at this version."""
        return self.info.n_cells

    def __repr__(self) -> str:
        """Return a one-line summary: path, version, cell and batch counts, read-only flag."""
        ro = ", read-only" if self._read_only else ""
        return (f"Atlas({self.source!r}, version={self.version}, cells={self.n_cells}, "
                f"batches={len(self.batches)}{ro})")

    # ------------------------------------------------------------------ reading
    def obs(self) -> pd.DataFrame:
        """Every atlas cell and what the engine knows of it.

        Returns
        -------
        pandas.DataFrame
            Index: cell name. Columns: dataset, batch, label, version_added, for ingested cells
            the transferred ``predicted_label``, its ``uncertainty``, ``is_unknown`` and the
            novelty columns as computed by the version that added them, then every obs column
            the datasets brought (missing for cells of a dataset without it; text as strings,
            integers ``Int64``, floats ``float64``, booleans ``boolean``; names the engine uses
            prefixed ``user_``).
        """
        return self._reader.obs()

    def latent(self) -> np.ndarray:
        """Embeddings of all atlas cells under this version's model, rows aligned to :meth:`obs`."""
        return self._reader.latent()

    def counts(self) -> sp.csr_matrix:
        """Raw counts of every atlas cell at this version (CSR, rows aligned to :meth:`obs`), read from the store."""
        return self._reader.counts()

    def predictions(self, version: int | None = None) -> pd.DataFrame | None:
        """Return the label predictions stored for the cells ``version`` (default: this one) added.

        Returns
        -------
        pandas.DataFrame or None
            As :meth:`transfer_labels` returns them, computed when the cells were folded in;
            None for version 1 (the reference).
        """
        return self._reader.predictions(version)

    def to_anndata(
        self, version: int | None = None, counts: bool = False, cells: CellSelection | None = None
    ) -> ad.AnnData:
        """Return the atlas (or some of its cells) as an AnnData for scanpy.

        Parameters
        ----------
        version
            A committed version up to this one (default: this one).
        counts
            Read the raw counts into ``X`` from the cell store (default: no ``X``).
        cells
            Cell names (in the order given), or a boolean mask over :meth:`obs` rows, a pandas
            Series read by its cell names (default: every cell).

        Returns
        -------
        anndata.AnnData
            ``obs`` as :meth:`obs`, ``obsm["X_atlasengine"]`` the embedding under that version's
            model, ``uns["atlasengine"]`` the atlas and version.

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> atlas = example_atlas(getfixture("tmp_path") / "a.atlas")
        >>> adata = atlas.to_anndata(cells=atlas.obs()["version_added"] == 2, counts=True)
        >>> adata.shape, adata.obsm["X_atlasengine"].shape
        ((100, 2000), (100, 4))
        """
        reader = self._reader if version is None or version == self.version else VersionReader(
            self._reader.store, self._reader.manifest, version)
        return atlas_anndata(reader, counts=counts, cells=cells)

    def model(self) -> CVAE:
        """Return the model of this version (eval mode)."""
        module = CVAE(self._reader.manifest.n_genes, len(self.info.batches), self.config.model)
        module.load_state_dict(self._reader.checkpoint().weights)
        return module.eval()

    def fisher(self) -> dict[str, torch.Tensor]:
        """Return the accumulated diagonal Fisher stored with this version."""
        return self._reader.checkpoint().fisher

    def anchor_params(self) -> dict[str, torch.Tensor]:
        """Return the anchor weights stored with this version (the weights EWC pulls towards)."""
        return self._reader.checkpoint().anchor

    def neighbor_index(self) -> NeighborIndex:
        """Return the faiss index over this version's labelled atlas cells (built once per version)."""
        return self._reader.index()

    def novelty_calibration(self) -> NoveltyCalibration:
        """Leave-one-out novelty scores of reference cells for this version.

        Stored with the version; computed from the stored embeddings for versions written
        before calibrations were stored, or before they kept each cell's predicted label.
        """
        stored = self._reader.stored_calibration()
        if stored is not None and stored.predicted is not None:
            return stored
        return self._calibration(self.config.transfer)

    def _calibration(self, tcfg: TransferConfig) -> NoveltyCalibration:
        key = (tcfg.k, tcfg.kernel, tcfg.novelty_k, tcfg.novelty_smoothing)
        if key not in self._calibrations:
            obs = self._reader.cell_obs()
            labelled = obs["label"].notna().to_numpy()
            self._calibrations[key] = calibrate(self.neighbor_index(), self.latent()[labelled], tcfg,
                                                obs["batch"].astype(str).to_numpy()[labelled])
        return self._calibrations[key]

    # ---------------------------------------------------------------- embedding
    def embed(self, adata: ad.AnnData, batch_key: str, layer: str | None = None) -> np.ndarray:
        """Embed cells without folding them in.

        A batch the atlas knows uses its own batch column; an unknown batch gets a zero batch
        input (the scArches way of projecting an unseen batch).

        Parameters
        ----------
        adata
            Raw counts; genes are matched to the atlas's by name (absent genes count zero).
        batch_key
            Obs column of the batch.
        layer
            The layer holding raw counts, if not ``X``.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)`` posterior means, rows in ``adata``'s order.
        """
        prep = prepare_input(
            adata, batch_key=batch_key, label_key=None, layer=layer, dataset="embed", atlas_genes=self.genes,
            min_gene_overlap=self.config.continual.min_gene_overlap, existing_batches=self.batches,
            new_batches_only=False, stream=False,
        )
        idx = pd.Index(self.batches).get_indexer(prep.obs["batch"])  # -1 for unknown batches
        return embed(self.model(), [CellData(prep.counts, idx)])

    def transfer_labels(
        self, adata: ad.AnnData, batch_key: str, layer: str | None = None, config: TransferConfig | dict | None = None
    ) -> pd.DataFrame:
        """Weighted-kNN labels for cells not folded in (embedded with this version's model).

        Parameters
        ----------
        adata, batch_key, layer
            The cells, as for :meth:`embed`.
        config
            Changes to the atlas's transfer settings (e.g. ``{"unknown_rule": "novelty"}``); a
            change of ``k``, ``kernel``, ``novelty_k`` or ``novelty_smoothing`` gets its own
            calibration, computed once per opened version. The neighbour index settings
            (``index``, ``approximate_above``, ``hnsw_*``, ``ivf_*``) are those the version's
            stored index was built with; a change is refused (an :class:`InputError`).

        Returns
        -------
        pandas.DataFrame
            Index: cell name. ``label`` (or "Unknown"), ``predicted_label``, ``uncertainty``,
            ``is_unknown``, ``nearest_type``, ``novelty``, ``novelty_pvalue``, ``is_novel``, one
            ``p_<label>`` per reference label; ``attrs["novel_share"]`` and
            ``attrs["novel_share_interval"]`` estimate the share of new cells (an approximate 90% interval).

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> from atlasengine.datasets import pancreas
        >>> atlas, data = example_atlas(getfixture("tmp_path") / "a.atlas"), pancreas()  # versions 1 and 2
        >>> pred = atlas.transfer_labels(data[data.obs.tech == "smartseq2"].copy(), batch_key="tech")
        >>> len(pred), list(pred.columns[:4])
        (100, ['label', 'predicted_label', 'uncertainty', 'is_unknown'])
        """
        tcfg = merged(self.config.transfer, config)
        refuse_index_changes(self.config.transfer, tcfg)
        z = self.embed(adata, batch_key, layer)
        calibration = self.novelty_calibration()
        if not matches(calibration, tcfg):
            calibration = self._calibration(tcfg)
        source = as_input(adata)
        return predict(self.neighbor_index(), calibration, z, tcfg, [str(c) for c in source.obs_names],
                       batches=source.obs[batch_key].astype(str).to_numpy())

    def unknown_groups(self, version: int | None = None, min_size: int | None = None,
                       n_markers: int = 10, gene_key: str | None = None) -> pd.DataFrame:
        """Group the cells a version called Unknown (or novel) and say what each group looks like.

        Parameters
        ----------
        version
            The version whose new cells are grouped (default: the newest up to this one that added
            cells; not 1, the reference). Cells a relabel has named since are left out.
        min_size
            The smallest group (default: 2% of the cells, at least 5); cells in no group are left out.
        n_markers
            Marker genes per group.
        gene_key
            A gene column of :meth:`var` to name the markers by (e.g. ``"gene_symbol"`` where the
            genes are Ensembl IDs); default: the atlas's gene names.

        Returns
        -------
        pandas.DataFrame
            One row per group (largest first): ``n_cells``, ``closest_type`` (the label its
            cells' reference neighbours point to most) and ``closest_share``, ``distance`` (of
            the embedding centroids), ``markers`` (top genes against the closest type's cells,
            Wilcoxon rank-sum on log-normalised stored counts) and ``cells``;
            ``.attrs["markers"][group]`` holds each group's marker table, with the gene columns.

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> from atlasengine.datasets import pancreas
        >>> atlas, data = example_atlas(getfixture("tmp_path") / "a.atlas"), pancreas()  # versions 1 and 2
        >>> groups = atlas.unknown_groups()  # what version 2 (celseq2) called Unknown
        >>> list(groups.columns)
        ['n_cells', 'closest_type', 'closest_share', 'distance', 'markers', 'cells']
        """
        return unknown_groups(self._reader, version, min_size, n_markers, gene_key=gene_key)

    # ------------------------------------------------------------------ writing
    def ingest(
        self,
        adata: ad.AnnData | SomaInput,
        batch_key: str,
        *,
        strategy: FoldInStrategy = "ewc",
        label_key: str | None = None,
        dataset: str | None = None,
        layer: str | None = None,
        training: TrainingConfig | dict | None = None,
        continual: ContinualConfig | dict | None = None,
        runtime: RuntimeConfig | dict | None = None,
    ) -> IngestResult:
        """Fold ``adata`` into the atlas as the next version.

        Nothing becomes visible until the new version is complete; a failure at any point
        leaves the atlas at its previous version.

        Parameters
        ----------
        adata
            Raw counts of the new cells, with batches the atlas does not know yet: an AnnData in
            memory, a backed one or a :class:`SomaInput` (streamed, as for :meth:`create`).
        batch_key
            Obs column of the batch.
        strategy
            ``"ewc"`` (all weights train under the EWC penalty, with replayed atlas cells),
            ``"finetune"`` (all weights, no penalty) or ``"surgery"`` (only the new batch
            columns).
        label_key
            Obs column of known labels, if any: they join the neighbour index for later
            queries, while this query's predictions (and the transfer summary comparing them
            with these labels) come from the cells the atlas held before it.
        dataset
            Name of the dataset in the atlas (default ``dataset_v<N>``).
        layer
            The layer holding raw counts, if not ``X``.
        training, continual
            Changes to the atlas's query-training and continual settings for this ingest: a dict,
            or a settings object whose fields given change (the others stay the atlas's).
        runtime
            Accelerator, devices and progress display (not stored).

        Returns
        -------
        IngestResult
            The new version's record, the new cells' predictions and embeddings, the training.

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> from atlasengine.datasets import pancreas
        >>> atlas, data = example_atlas(getfixture("tmp_path") / "a.atlas"), pancreas()  # versions 1 and 2
        >>> res = atlas.ingest(data[data.obs.tech == "smartseq2"].copy(), batch_key="tech")
        >>> res.version.number, len(res.predictions), res.latent.shape
        (3, 100, (100, 4))
        """
        self._check_writable("ingest")
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        committed = foldin.ingest(
            self._reader.store, adata, batch_key=batch_key, strategy=strategy, label_key=label_key, dataset=dataset,
            layer=layer, training=merged(self.config.query_training, training),
            continual=merged(self.config.continual, continual), runtime=merged(RuntimeConfig(), runtime),
        )
        self._reader = committed.reader()
        self._calibrations.clear()
        return IngestResult(
            version=committed.info,
            predictions=committed.files.predictions.copy(),  # the reader keeps its own
            latent=committed.files.latent[committed.new_cells],
            training=committed.train.summary(),
            genes_padded=committed.prepared.genes_padded,
            genes_dropped=committed.prepared.genes_dropped,
            history=committed.train.history,
            query=adata,
            atlas_path=str(self.path),
        )

    def relabel(self, cells: CellSelection, label: str, *, note: str | None = None) -> VersionInfo:
        """Give ``cells`` the cell type ``label`` in a new version that changes labels only.

        Nothing is retrained: the new version has this version's weights, accumulated Fisher,
        anchor and embeddings; its neighbour index and novelty calibration are rebuilt from the
        new labels, so the next ingest labels cells of that type with it (cells ingested without
        a label join the index once they carry one). Earlier versions keep their labels.

        Parameters
        ----------
        cells
            Cell names (the index of :meth:`obs`), e.g. a group's ``cells`` from
            :meth:`unknown_groups`, or a boolean mask aligned to :meth:`obs`.
        label
            A new or existing type name (plain text; not ``"Unknown"``, not empty).
        note
            Why, kept with the version's record.

        Returns
        -------
        VersionInfo
            The new version's record; ``.relabel`` says how many cells were renamed and from which labels.

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> from atlasengine.datasets import pancreas
        >>> atlas, data = example_atlas(getfixture("tmp_path") / "a.atlas"), pancreas()  # versions 1 and 2
        >>> obs = atlas.obs()
        >>> info = atlas.relabel(obs.index[obs["label"] == "acinar"][:3], "acinar_like", note="an example")
        >>> info.number, info.relabel.n_cells, info.relabel.from_labels
        (3, 3, {'acinar': 3})
        """
        self._check_writable("relabel")
        done = relabel(self._reader.store, self.version, cells, label, note)
        self._reader = done.reader()
        self._calibrations.clear()
        return done.info

    # -------------------------------------------------------------------- drift
    def drift(self, by: str | None = None) -> pd.DataFrame:
        """Drift measures up to this version.

        Parameters
        ----------
        by
            None: one row per (version, scope); ``"cell_type"``: per reference cell type;
            ``"batch"``: per batch; ``"flags"``: thresholds crossed; ``"cell"``: per cell;
            ``"versions"``: the version history.

        Returns
        -------
        pandas.DataFrame
            The table's rows of the versions up to this one.

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> from atlasengine.datasets import pancreas
        >>> atlas, data = example_atlas(getfixture("tmp_path") / "a.atlas"), pancreas()  # versions 1 and 2
        >>> drift = atlas.drift()
        >>> sorted(set(drift["version"])), list(drift.columns[:3])
        ([1, 2], ['version', 'scope', 'n_cells'])
        """
        if by not in DRIFT_TABLES:
            raise InputError(f"by must be one of {list(DRIFT_TABLES)}, got {by!r}")
        with drift_store(self._reader, [DRIFT_TABLES[by]]) as db:
            return db.read(DRIFT_TABLES[by], self.version)

    def sql(self, query: str) -> pd.DataFrame:
        """Run a read-only SQL query over the drift tables and the atlas's cells (as of this version).

        Tables: versions, version_drift, celltype_drift, batch_drift, cell_drift, drift_flags,
        transfer_summary, and ``cells``: one row per cell, ``cell`` (its name, as in
        ``cell_drift``) and the columns of :meth:`obs`, the user's own obs columns included,
        e.g. ``select disease, count(*) from cells where is_unknown group by disease``.

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> from atlasengine.datasets import pancreas
        >>> atlas, data = example_atlas(getfixture("tmp_path") / "a.atlas"), pancreas()  # versions 1 and 2
        >>> atlas.sql("select version, count(*) as cells from cell_drift group by version order by version")
           version  cells
        0        1    247
        1        2    247
        """
        return query_atlas(self._reader, query)

    def report(self, path: str | Path) -> Path:
        """Write the drift audit report (one self-contained HTML file, readable offline) to ``path``; return its path.

        The same report as :meth:`audit`, which also returns its checks.
        """
        return render_atlas_report(self._reader, path).path

    def audit(self, path: str | Path) -> Report:
        """Write the drift audit report to ``path`` and return it with its checks and headline.

        ``Report.status`` is the worst of the version's checks (green, amber, red);
        ``Report.headline`` the lines the report's summary opens with.

        Examples
        --------
        >>> from atlasengine import example_atlas
        >>> atlas = example_atlas(getfixture("tmp_path") / "a.atlas")
        >>> report = atlas.audit(getfixture("tmp_path") / "audit.html")
        >>> report.path.name, report.status in {"green", "amber", "red", "grey"}
        ('audit.html', True)
        """
        return render_atlas_report(self._reader, path)
