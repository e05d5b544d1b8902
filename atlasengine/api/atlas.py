"""The ``Atlas``: a versioned reference that folds in queries with online EWC.

Example:
    >>> import anndata as ad
    >>> from atlasengine import Atlas
    >>> ref = ad.read_h5ad("../shared/data/pancreas_panc8_small.h5ad")  # doctest: +SKIP
    >>> atlas = Atlas.create("p.atlas", ref[ref.obs.tech != "smartseq2"], batch_key="tech", label_key="celltype")  # doctest: +SKIP
    >>> res = atlas.ingest(ref[ref.obs.tech == "smartseq2"], batch_key="tech", strategy="ewc")  # doctest: +SKIP
    >>> atlas.version, Atlas.open("p.atlas", version=1).latent().shape  # doctest: +SKIP
    (2, (400, 10))
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from atlasengine.api.audit import record_drift, render_atlas_report, transfer_summary
from atlasengine.api.inputs import PreparedInput, prepare_input
from atlasengine.api.upgrade import upgrade_atlas
from atlasengine.config import AtlasConfig, ContinualConfig, TrainingConfig, TransferConfig
from atlasengine.continual import (
    STRATEGIES,
    EWCPenalty,
    FoldInStrategy,
    accumulate_fisher,
    diagonal_fisher,
    fisher_summary,
    surgery_mode,
)
from atlasengine.drift import DriftStore
from atlasengine.errors import AtlasFormatError, InputError, ReadOnlyError
from atlasengine.model import CVAE
from atlasengine.store.atlas_store import AtlasStore
from atlasengine.store.cells import joinids_of
from atlasengine.store.checkpoint import load_checkpoint, save_checkpoint
from atlasengine.faults import fault_point
from atlasengine.store.lock import WriteLock, break_lock, lock_holder
from atlasengine.store.manifest import AtlasNeedsUpgrade, DatasetRecord, Manifest, VersionInfo
from atlasengine.training import CellData, TrainResult, fit
from atlasengine.transfer import UNKNOWN, NeighborIndex, label_probabilities
from atlasengine.transfer.knn import prediction_table
from atlasengine.transfer.novelty import (
    CALIBRATION_FILE,
    NoveltyCalibration,
    calibration_note,
    novelty_scores,
    reference_calibration,
)

log = logging.getLogger("atlasengine")

CHECKPOINT = "model.safetensors"
CONFIG = "config.json"
LATENT = "latent.npy"
PREDICTIONS = "predictions.parquet"
INDEX_DIR = "index"


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


class Atlas:
    """A versioned single-cell reference atlas on disk.

    Create one with :meth:`Atlas.create`, open one with :meth:`Atlas.open`, fold in new data
    with :meth:`ingest`. An atlas opened at an earlier version is read-only.
    """

    def __init__(self, store: AtlasStore, manifest: Manifest, version: int, read_only: bool) -> None:
        self._store = store
        self._manifest = manifest
        self._version = version
        self._read_only = read_only
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        adata: ad.AnnData,
        batch_key: str,
        label_key: str,
        *,
        dataset: str = "reference",
        layer: str | None = None,
        config: AtlasConfig | dict | None = None,
    ) -> "Atlas":
        """Train the reference model on ``adata`` and write version 1 of a new atlas at ``path``.

        The atlas appears at ``path`` only when complete (it is built beside it and renamed).
        """
        root = Path(path)
        cfg = config if isinstance(config, AtlasConfig) else AtlasConfig.model_validate(config or {})
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise InputError(f"{root} already exists; choose a new path or open it with Atlas.open")
        prep = prepare_input(
            adata,
            batch_key=batch_key,
            label_key=label_key,
            layer=layer,
            dataset=dataset,
            atlas_genes=None,
            min_gene_overlap=cfg.continual.min_gene_overlap,
        )
        genes = [str(g) for g in adata.var_names]
        tmp = root.with_name(f".{root.name}.creating-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir(parents=True)
            store = AtlasStore(tmp)
            store.cells.create(str(tmp / "cells"), genes)
            prep.obs["version_added"] = 1
            start, stop = store.cells.append(prep.obs, prep.counts)
            record = DatasetRecord(
                name=dataset, version=1, joinid_start=start, joinid_stop=stop, batch_key=batch_key,
                label_key=label_key, batches=prep.batches, genes_matched=prep.genes_matched, genes_padded=0,
            )
            manifest = Manifest(n_genes=len(genes), label_key=label_key, config=cfg, datasets=[record])
            torch.manual_seed(cfg.reference_training.seed)  # initial weights follow the seed
            module = CVAE(len(genes), len(prep.batches), cfg.model)
            data = CellData(prep.counts, np.arange(len(prep.batches))[pd.Index(prep.batches).get_indexer(prep.obs["batch"])])
            log.info("training the reference model on %d cells", prep.n_cells)
            result = fit(module, data, cfg.reference_training)
            atlas = cls(store, manifest, 0, read_only=False)
            atlas._write_version(
                manifest, module, strategy="reference", train=result, fisher_prev=None, parent=None,
                new_dataset=record, batches=prep.batches, config_used={"training": cfg.reference_training.model_dump()},
            )
            if root.exists():
                root.rmdir()
            tmp.rename(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(root)

    @classmethod
    def open(cls, path: str | Path, version: int | None = None, read_only: bool | None = None) -> "Atlas":
        """Open an atlas at its newest version, or read-only at an earlier ``version``."""
        store = AtlasStore(Path(path))
        try:
            manifest = store.read_manifest()
        except AtlasNeedsUpgrade:
            upgrade_atlas(store.root)
            manifest = store.read_manifest()
        if not manifest.versions:
            raise AtlasFormatError(f"{path} has no committed version")
        current = manifest.current
        number = current if version is None else int(version)
        manifest.version(number)  # raises for an unknown version
        ro = (number != current) if read_only is None else bool(read_only or number != current)
        store.verify(manifest.version(number))
        return cls(store, manifest.truncated(number), number, ro)

    @staticmethod
    def break_lock(path: str | Path, force: bool = False) -> bool:
        """Remove the write lock of a process that died (``force``: of any process)."""
        return break_lock(Path(path), force=force)

    @staticmethod
    def lock_holder(path: str | Path) -> dict | None:
        """Who holds the write lock (pid, host, since, stale), or None."""
        return lock_holder(Path(path))

    # --------------------------------------------------------------- properties
    @property
    def path(self) -> Path:
        return self._store.root

    @property
    def version(self) -> int:
        """The version this object shows."""
        return self._version

    @property
    def versions(self) -> list[VersionInfo]:
        """Committed versions up to this one, oldest first."""
        return list(self._manifest.versions)

    @property
    def info(self) -> VersionInfo:
        return self._manifest.version(self._version)

    @property
    def config(self) -> AtlasConfig:
        return self._manifest.config

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def genes(self) -> list[str]:
        if "genes" not in self._cache:
            self._cache["genes"] = self._store.cells.genes()
        return self._cache["genes"]

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
        return self.info.n_cells

    def __repr__(self) -> str:
        ro = ", read-only" if self._read_only else ""
        return f"Atlas({str(self.path)!r}, version={self._version}, cells={self.n_cells}, batches={len(self.batches)}{ro})"

    # ------------------------------------------------------------------ reading
    def _ranges(self, manifest: Manifest | None = None, number: int | None = None) -> list[tuple[int, int]]:
        m = manifest or self._manifest
        n = self._version if number is None else number
        return [(d.joinid_start, d.joinid_stop) for d in m.datasets_until(n)]

    def obs(self) -> pd.DataFrame:
        """Every atlas cell (index: cell name): dataset, batch, label, version_added, and for
        ingested cells the transferred ``predicted_label``, its ``uncertainty`` and ``is_unknown``
        (uncertainty above the cut-off) as computed by the version that added them."""
        if "obs" not in self._cache:
            df = self._store.cells.read_obs(self._ranges())
            df = df.reset_index(drop=True).set_index("obs_id")
            df.index.name = "cell"
            df["label"] = df["label"].astype(object).where(df["label"].notna(), None)
            preds = [self._predictions(v) for v in self._manifest.versions if v.number > 1]
            preds = [p for p in preds if p is not None]
            df["predicted_label"] = None
            df["uncertainty"] = np.nan
            df["is_unknown"] = None
            if preds:
                p = pd.concat(preds)
                common = df.index.intersection(p.index)
                for col in ("predicted_label", "uncertainty", "is_unknown"):
                    df.loc[common, col] = p.loc[common, col].to_numpy()
            self._cache["obs"] = df
        return self._cache["obs"].copy()

    def latent(self) -> np.ndarray:
        """Embeddings of all atlas cells under this version's model, rows aligned to :meth:`obs`."""
        if "latent" not in self._cache:
            self._cache["latent"] = np.load(self._store.file(self.info, LATENT), allow_pickle=False)
        return self._cache["latent"].copy()

    def _checkpoint(self, info: VersionInfo):
        return load_checkpoint(self._store.file(info, CHECKPOINT))

    def model(self) -> CVAE:
        """The model of this version (eval mode)."""
        weights, _, _ = self._checkpoint(self.info)
        module = CVAE(self._manifest.n_genes, len(self.info.batches), self.config.model)
        module.load_state_dict(weights)
        return module.eval()

    def fisher(self) -> dict[str, torch.Tensor]:
        """The accumulated diagonal Fisher stored with this version."""
        return self._checkpoint(self.info)[1]

    def anchor_params(self) -> dict[str, torch.Tensor]:
        """The anchor weights stored with this version (the weights EWC pulls towards)."""
        return self._checkpoint(self.info)[2]

    def _predictions(self, info: VersionInfo) -> pd.DataFrame | None:
        if PREDICTIONS not in info.files:
            return None
        return pd.read_parquet(self._store.file(info, PREDICTIONS))

    def neighbor_index(self) -> NeighborIndex:
        """The faiss index over this version's labelled atlas cells (built once per version)."""
        if "index" not in self._cache:
            for key in self.info.files:
                if key.startswith(INDEX_DIR + "/"):
                    self._store.file(self.info, key)  # verify every index file
            self._cache["index"] = NeighborIndex.load(self._store.version_dir(self._version) / INDEX_DIR)
        return self._cache["index"]

    # ---------------------------------------------------------------- embedding
    def _prepare_query(self, adata: ad.AnnData, batch_key: str, layer: str | None, label_key: str | None,
                       dataset: str, new_batches_only: bool) -> PreparedInput:
        return prepare_input(
            adata, batch_key=batch_key, label_key=label_key, layer=layer, dataset=dataset,
            atlas_genes=self.genes, min_gene_overlap=self.config.continual.min_gene_overlap,
            existing_batches=self.batches, new_batches_only=new_batches_only,
        )

    def embed(self, adata: ad.AnnData, batch_key: str, layer: str | None = None) -> np.ndarray:
        """Embed cells without folding them in.

        A batch the atlas knows uses its own batch column; an unknown batch gets a zero batch
        input (the scArches way of projecting an unseen batch).
        """
        prep = self._prepare_query(adata, batch_key, layer, None, "embed", new_batches_only=False)
        idx = pd.Index(self.batches).get_indexer(prep.obs["batch"])  # -1 for unknown batches
        return _embed(self.model(), CellData(prep.counts, idx))

    def transfer_labels(
        self, adata: ad.AnnData, batch_key: str, layer: str | None = None, config: TransferConfig | dict | None = None
    ) -> pd.DataFrame:
        """Weighted-kNN labels for cells not folded in (embedded with this version's model).

        Columns: ``label`` (or "Unknown"), ``predicted_label``, ``uncertainty``, ``is_unknown``,
        ``novelty``, ``novelty_pvalue``, ``is_novel``, one ``p_<label>`` per reference label.
        A ``config`` that changes ``k``, ``kernel`` or ``novelty_k`` gets its own calibration,
        computed once per opened version.
        """
        tcfg = self._transfer_config(config)
        z = self.embed(adata, batch_key, layer)
        calibration = self.novelty_calibration()
        key = ("calibration", tcfg.k, tcfg.kernel, tcfg.novelty_k)
        if (calibration.k_transfer, calibration.kernel, calibration.k) != key[1:]:
            if key not in self._cache:
                labelled = self.obs()["label"].notna().to_numpy()
                self._cache[key] = self._calibrate(self.neighbor_index(), self.latent(), labelled, tcfg)
            calibration = self._cache[key]
        return _predict(self.neighbor_index(), calibration, z, tcfg, [str(c) for c in adata.obs_names])

    def novelty_calibration(self) -> NoveltyCalibration:
        """Leave-one-out novelty scores of reference cells for this version (stored with it;
        computed from the stored embeddings for versions written before it, or before it kept
        each calibration cell's predicted label)."""
        if "calibration" not in self._cache:
            cal = None
            if CALIBRATION_FILE in self.info.files:
                cal = NoveltyCalibration.load(self._store.file(self.info, CALIBRATION_FILE))
            if cal is None or cal.predicted is None:  # none stored, or stored before it kept predicted labels
                labelled = self.obs()["label"].notna().to_numpy()
                cal = self._calibrate(self.neighbor_index(), self.latent(), labelled, self.config.transfer)
            self._cache["calibration"] = cal
        return self._cache["calibration"]

    @staticmethod
    def _calibrate(index: NeighborIndex, z: np.ndarray, labelled: np.ndarray, tcfg: TransferConfig) -> NoveltyCalibration:
        return reference_calibration(index, z[labelled], k=tcfg.novelty_k, k_transfer=tcfg.k, kernel=tcfg.kernel,
                                     max_cells=5000, seed=0)

    def _transfer_config(self, config: TransferConfig | dict | None) -> TransferConfig:
        return _merge(self.config.transfer, config)

    # ------------------------------------------------------------------ writing
    def ingest(
        self,
        adata: ad.AnnData,
        batch_key: str,
        *,
        strategy: FoldInStrategy = "ewc",
        label_key: str | None = None,
        dataset: str | None = None,
        layer: str | None = None,
        training: TrainingConfig | dict | None = None,
        continual: ContinualConfig | dict | None = None,
    ) -> IngestResult:
        """Fold ``adata`` into the atlas as the next version.

        ``strategy``: ``"ewc"`` (all weights train under the EWC penalty, with replayed atlas
        cells), ``"finetune"`` (all weights, no penalty) or ``"surgery"`` (only the new batch
        columns). Nothing becomes visible until the new version is complete.
        """
        if self._read_only:
            raise ReadOnlyError(f"this Atlas shows version {self._version} read-only; open the newest version to ingest")
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        tcfg = _merge(self.config.query_training, training)
        ccfg = _merge(self.config.continual, continual)
        with WriteLock(self.path):
            manifest = self._store.read_manifest()  # another writer may have committed since we opened
            self._store.remove_uncommitted(manifest)
            self._purge_uncommitted_rows(manifest)
            n_old = manifest.current
            number = n_old + 1
            dataset = dataset or f"dataset_v{number}"
            if any(d.name == dataset for d in manifest.datasets):
                raise InputError(f"a dataset named {dataset!r} is already in the atlas; pass dataset=<new name>")
            prev_info = manifest.version(n_old)
            prep = prepare_input(
                adata, batch_key=batch_key, label_key=label_key, layer=layer, dataset=dataset,
                atlas_genes=self.genes, min_gene_overlap=ccfg.min_gene_overlap,
                existing_batches=prev_info.batches, new_batches_only=True,
            )
            self._check_new_cell_names(manifest, prep.obs["obs_id"])
            batches = [*prev_info.batches, *prep.batches]
            prep.obs["version_added"] = number
            start, stop = self._store.cells.append(prep.obs, prep.counts)
            fault_point("after_cells")
            record = DatasetRecord(
                name=dataset, version=number, joinid_start=start, joinid_stop=stop, batch_key=batch_key,
                label_key=label_key, batches=prep.batches, genes_matched=prep.genes_matched, genes_padded=prep.genes_padded,
            )
            weights, fisher_prev, anchor = self._checkpoint(prev_info)
            module = CVAE(manifest.n_genes, len(prev_info.batches), manifest.config.model)
            module.load_state_dict(weights)
            module.add_batches(len(prep.batches), seed=tcfg.seed)
            query = CellData(prep.counts, pd.Index(batches).get_indexer(prep.obs["batch"]))
            log.info("folding in %d cells with %s", prep.n_cells, strategy)
            fault_point("training")
            if strategy == "surgery":
                with surgery_mode(module, len(prev_info.batches)):
                    result = fit(module, query, tcfg.model_copy(update={"weight_decay": 0.0}))
            elif strategy == "finetune":
                result = fit(module, query, tcfg)
            else:
                replay = self._replay_sample(manifest, n_old, batches, ccfg.replay_max_cells, tcfg.seed)
                penalty = EWCPenalty(module, fisher_prev, anchor, ccfg.ewc_lambda)
                result = fit(module, query, tcfg, replay=replay, replay_fraction=ccfg.replay_fraction, penalty=penalty)
            new_manifest = manifest.model_copy(update={"datasets": [*manifest.datasets, record]})
            config_used = {"training": tcfg.model_dump(), "continual": ccfg.model_dump(), "strategy": strategy}
            info = self._write_version(
                new_manifest, module, strategy=strategy, train=result, fisher_prev=fisher_prev, parent=n_old,
                new_dataset=record, batches=batches, config_used=config_used, continual=ccfg,
            )
        fresh = Atlas.open(self.path)
        self.__dict__.update(fresh.__dict__)
        preds = self._predictions(info)
        z_new = self.latent()[-prep.n_cells:]
        return IngestResult(
            version=info, predictions=preds, latent=z_new, training=result.summary(),
            genes_padded=prep.genes_padded, genes_dropped=prep.genes_dropped, history=result.history,
        )

    def _check_new_cell_names(self, manifest: Manifest, names: pd.Series) -> None:
        """Refuse cell names already in the atlas (read in chunks: memory does not grow with the atlas)."""
        query = pa.array(names.astype(str).tolist(), type=pa.large_string())
        clash: list[str] = []
        for obs in self._iter_obs(manifest, ["obs_id"]):
            hit = pc.is_in(pa.array(obs["obs_id"].tolist(), type=pa.large_string()), value_set=query)
            clash += [v for v, h in zip(obs["obs_id"], hit.to_pylist()) if h]
            if len(clash) >= 5:
                break
        if clash:
            raise InputError(f"cell name(s) already in the atlas: {clash[:5]}; cell names must be unique across datasets")

    def _iter_obs(self, manifest: Manifest, columns: list[str], chunk: int = 200_000) -> Iterator[pd.DataFrame]:
        for a, b in self._ranges(manifest, manifest.current):
            for s in range(a, b, chunk):
                yield self._store.cells.read_obs_ids(np.arange(s, min(s + chunk, b)), columns)

    def _replay_sample(self, manifest: Manifest, number: int, batches: list[str], max_cells: int, seed: int) -> CellData | None:
        """A uniform sample of the atlas's committed cells, read from the store."""
        ids = joinids_of(self._ranges(manifest, number))
        if max_cells == 0 or len(ids) == 0:
            return None
        rng = np.random.default_rng(seed)
        ids = np.sort(rng.choice(ids, size=min(len(ids), max_cells), replace=False))
        return self._cell_data(ids, batches, manifest.n_genes)

    def _cell_data(self, ids: np.ndarray, batches: list[str], n_genes: int) -> CellData:
        obs = self._store.cells.read_obs_ids(ids, ["batch"])
        counts = self._store.cells.read_counts(ids, n_genes)
        return CellData(counts, pd.Index(batches).get_indexer(obs["batch"]))

    def _purge_uncommitted_rows(self, manifest: Manifest) -> None:
        """Drop drift rows of versions the manifest does not list (a failed earlier attempt)."""
        with DriftStore(self._store.drift_path) as db:
            db.delete_versions_after(manifest.current)

    # -------------------------------------------------------------------- drift
    def drift(self, by: str | None = None) -> pd.DataFrame:
        """Drift measures up to this version.

        ``by=None``: one row per (version, scope); ``"cell_type"``: per reference cell type;
        ``"batch"``: per batch; ``"flags"``: thresholds crossed; ``"cell"``: per cell.
        """
        tables = {None: "version_drift", "cell_type": "celltype_drift", "batch": "batch_drift",
                  "flags": "drift_flags", "cell": "cell_drift", "versions": "versions"}
        if by not in tables:
            raise InputError(f"by must be one of {list(tables)}, got {by!r}")
        with DriftStore(self._store.drift_path, read_only=True) as db:
            return db.read(tables[by], self._version)

    def sql(self, query: str) -> pd.DataFrame:
        """Run a read-only SQL query over the drift tables (as of this version).

        Tables: versions, version_drift, celltype_drift, batch_drift, cell_drift, drift_flags,
        transfer_summary.
        """
        with DriftStore(self._store.drift_path, read_only=True) as db:
            return db.sql(query, self._version)

    def report(self, path: str | Path) -> Path:
        """Write the drift audit report (one self-contained HTML file) to ``path``."""
        return render_atlas_report(self, path)

    def _write_version(
        self,
        manifest: Manifest,
        module: CVAE,
        *,
        strategy: str,
        train: TrainResult,
        fisher_prev: dict[str, torch.Tensor] | None,
        parent: int | None,
        new_dataset: DatasetRecord,
        batches: list[str],
        config_used: dict[str, Any],
        continual: ContinualConfig | None = None,
    ) -> VersionInfo:
        """Compute Fisher, embeddings and index of the new model, write them, commit the manifest."""
        ccfg = continual or manifest.config.continual
        number = new_dataset.version
        ranges = self._ranges(manifest, number)
        # Fisher of this version from a bounded uniform sample of all atlas cells
        t0 = time.perf_counter()
        ids = joinids_of(ranges)
        rng = np.random.default_rng(ccfg.fisher_max_cells + number)
        sample = np.sort(rng.choice(ids, size=min(len(ids), ccfg.fisher_max_cells), replace=False))
        store = self._store
        f_version = diagonal_fisher(module, self._cell_data(sample, batches, manifest.n_genes), len(sample), ccfg.fisher_chunk_size, seed=number)
        fisher = accumulate_fisher(fisher_prev, f_version, ccfg.fisher_gamma)
        fisher_seconds = time.perf_counter() - t0
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        z = _embed_store(module, store, ranges, manifest.n_genes, batches)
        obs = store.cells.read_obs(ranges).reset_index(drop=True).set_index("obs_id")
        labelled = obs["label"].notna().to_numpy()
        labels = sorted(set(obs["label"][labelled].astype(str)))
        new_cells = (obs["version_added"] == number).to_numpy()
        staged = store.stage()
        fault_point("checkpoint")
        save_checkpoint(staged / CHECKPOINT, weights, fisher, weights)
        fault_point("checkpoint_written")
        np.save(staged / LATENT, z.astype(np.float32), allow_pickle=False)
        (staged / CONFIG).write_text(json.dumps({"model": manifest.config.model.model_dump(), **config_used}, indent=2))
        index = NeighborIndex.build(z[labelled], obs["label"][labelled].astype(str).to_numpy(), manifest.config.transfer)
        index.save(staged / INDEX_DIR)
        calibration = self._calibrate(index, z, labelled, manifest.config.transfer)
        calibration.save(staged / CALIBRATION_FILE)
        summary = None
        if parent is not None:
            # new cells that came with labels are in the index: each is scored without itself
            index_position = np.where(labelled, np.cumsum(labelled) - 1, -1)[new_cells]
            preds = _predict(index, calibration, z[new_cells], manifest.config.transfer, obs.index[new_cells].tolist(),
                             exclude=index_position)
            preds.to_parquet(staged / PREDICTIONS)
            summary = transfer_summary(preds, obs["label"][new_cells], new_dataset.name)
        files = store.publish(staged, number)
        info = VersionInfo(
            number=number, strategy=strategy, parent=parent,
            datasets=[d.name for d in manifest.datasets_until(number)], n_cells=len(z), n_new_cells=int(new_cells.sum()),
            batches=batches, labels=labels, files=files,
            training={**train.summary(), "fisher_seconds": round(fisher_seconds, 3)},
            fisher={**fisher_summary(fisher), "cells": int(len(sample)), "gamma": ccfg.fisher_gamma},
        )
        fault_point("drift")
        previous = first = None
        if parent is not None:
            previous = self._stored_latent(manifest, parent)
            first = self._first_latent(manifest, parent)
        record_drift(
            store.drift_path, info, config_used, obs[["batch", "label", "dataset", "version_added"]], z,
            previous, first, manifest.config.drift, summary,
        )
        final = manifest.model_copy(update={"versions": [*manifest.versions, info]})
        fault_point("before_manifest")
        store.commit(final)
        return info

    def _stored_latent(self, manifest: Manifest, number: int) -> np.ndarray:
        return np.load(self._store.file(manifest.version(number), LATENT), allow_pickle=False)

    def _first_latent(self, manifest: Manifest, number: int) -> np.ndarray:
        """Each cell of version ``number`` embedded by the version that added it."""
        parts = []
        for version in sorted({d.version for d in manifest.datasets_until(number)}):
            z = self._stored_latent(manifest, version)
            before = sum(d.n_cells for d in manifest.datasets_until(version - 1))
            parts.append(z[before:])
        return np.concatenate(parts)


def _merge(base, override):
    if override is None:
        return base
    if isinstance(override, type(base)):
        return override
    if not isinstance(override, dict):
        raise InputError(f"expected {type(base).__name__} or dict, got {type(override).__name__}")
    try:
        return type(base).model_validate({**base.model_dump(), **override})
    except Exception as exc:
        raise InputError(f"invalid {type(base).__name__}: {exc}") from exc


def _predict(index: NeighborIndex, calibration: NoveltyCalibration, z: np.ndarray, tcfg: TransferConfig,
             obs_names: list[str], exclude: np.ndarray | None = None) -> pd.DataFrame:
    """Weighted-kNN labels plus the calibrated novelty score (distance + uncertainty).

    With ``tcfg.unknown_rule == "novelty"`` a cell is Unknown when its novelty is above the
    threshold calibrated on reference cells for ``tcfg.novelty_target`` false alarms, after the
    query's shift is taken off (``tcfg.novelty_calibration == "query"``, the default); otherwise
    the paper's rule (uncertainty above ``uncertainty_threshold``) decides. ``exclude``: each
    cell's position in the index, -1 if not in it (a fold-in that came with labels puts its
    cells in the index): those are searched without themselves.
    """
    # one search serves the labels and the novelty distance
    distances, neighbors = index.search(z, max(calibration.k, tcfg.k), exclude=exclude)
    probs = label_probabilities(
        distances[:, : tcfg.k], index.neighbor_codes(neighbors[:, : tcfg.k]), len(index.categories), tcfg.kernel
    )
    preds = prediction_table(probs, index.categories, tcfg, obs_names)
    nov = novelty_scores(distances, preds["uncertainty"].to_numpy(), calibration, target_rate=tcfg.novelty_target,
                         obs_names=obs_names, centre_on_query=tcfg.novelty_calibration == "query",
                         predicted=preds["predicted_label"].astype(str).to_numpy())
    for col in ("novelty", "novelty_pvalue", "is_novel"):
        preds[col] = nov[col].to_numpy()
    preds.attrs.update(unknown_rule=tcfg.unknown_rule, novelty_threshold=nov.attrs["novelty_threshold"],
                       novelty_calibration=nov.attrs["calibration"], novelty_query_shift=nov.attrs["query_shift"])
    if tcfg.unknown_rule == "novelty":
        note = calibration_note(nov)
        if note:
            log.warning(note)
            preds.attrs["novelty_note"] = note
        preds["is_unknown"] = preds["is_novel"]
        preds["label"] = preds["predicted_label"].where(~preds["is_unknown"], UNKNOWN)
    return preds


def _embed(module: CVAE, data: CellData, batch_size: int = 4096) -> np.ndarray:
    out = []
    for s in range(0, len(data), batch_size):
        x = torch.from_numpy(data.counts[s : s + batch_size].toarray())
        b = torch.from_numpy(data.batch[s : s + batch_size])
        out.append(module.latent(x, b).numpy())
    return np.concatenate(out) if out else np.zeros((0, module.config.n_latent), dtype=np.float32)


def _embed_store(module: CVAE, store: AtlasStore, ranges, n_genes: int, batches: list[str]) -> np.ndarray:
    """Embeddings of every cell in ``ranges``, read from the store in chunks."""
    lookup = pd.Index(batches)
    parts = [
        _embed(module, CellData(counts, lookup.get_indexer(obs["batch"])))
        for obs, counts in store.cells.iter_cells(ranges, n_genes)
    ]
    return np.concatenate(parts).astype(np.float32)
