"""One path through a new version: check the input, write the cells, train, build, commit.

``create`` (version 1) and ``ingest`` (version N+1 from version N) share it. A version is built
in memory from what the call already holds (the new cells' counts, the trained model, the
parent version's files) and written once: nothing this call wrote is read back. The steps and
where a crash can stop them:

1. under the write lock (held by the kernel: a killed writer holds nothing), the manifest is
   read again, leftovers of failed attempts removed and damaged drift parts rebuilt;
2. the new cells go to the cell store in a fresh joinid range (invisible until committed);
3. the model trains (:func:`atlasengine.continual.fold_in`);
4. the Fisher, embeddings, neighbour index, novelty calibration and predictions are computed;
5. the version's files and its drift rows are staged and published, and the manifest switch
   commits it, after checking that the manifest is still the one step 1 read (a second writer
   never overwrites a commit). Before 5 ends, readers see the previous version, exactly as it
   was.
"""

from __future__ import annotations

import glob
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch

from atlasengine.api.audit import drift_rows, rebuild_drift, transfer_summary, write_drift
from atlasengine.api.inputs import PreparedInput, prepare_gene_columns, prepare_input, prepare_metadata
from atlasengine.api.sources import SomaInput, as_input, is_streamed
from atlasengine.config import AtlasConfig, ContinualConfig, FoldInStrategy, RuntimeConfig, TrainingConfig
from atlasengine.continual import AccumulatedFisher, check_settings, fold_in, version_fisher
from atlasengine.errors import AtlasIntegrityError, AtlasWriteError, InputError
from atlasengine.faults import fault_point
from atlasengine.model import CVAE
from atlasengine.numerics import sorted_sample
from atlasengine.progress import phase
from atlasengine.store.atlas_store import AtlasStore, check_atlas_path, listed_paths
from atlasengine.store.cells import CellChecks, CellStore, cell_checksums, counts_checksums, joinids_of
from atlasengine.store.files import fsync_dir
from atlasengine.store.lock import LOCK_NAME, WriteLock, lock_holder
from atlasengine.store.manifest import DatasetRecord, Manifest, VersionInfo
from atlasengine.store.version import DRIFT_DIR, Checkpoint, VersionFiles, VersionReader, write_version_files
from atlasengine.training import CellData, TrainResult, check_runtime, embed_cells, fit
from atlasengine.transfer import NeighborIndex
from atlasengine.transfer.predict import calibrate, check_labelled_cells, predict

log = logging.getLogger("atlasengine")


# ----------------------------------------------------------------------------- cells
READ_CELLS = 8_192
"""Cells read from the store in one query (a 65,536-cell block at 500 non-zeros per cell read at once
held about 1.5 GB of coordinates and temporaries)."""


class StoredCells:
    """Committed cells of the atlas, read from the cell store on demand and checked (a ``CellSource``)."""

    def __init__(self, cells: CellStore, checks: CellChecks, batch_codes: np.ndarray, n_genes: int) -> None:
        self.cells, self.checks = cells, checks
        self.joinids = joinids_of([(a, b) for a, b, _ in checks.ranges])
        if len(batch_codes) != len(self.joinids):
            raise AtlasIntegrityError(f"the atlas's obs hold {len(batch_codes)} cells, its checksums "
                                      f"{len(self.joinids)} (damaged)")
        self.batch_codes = np.asarray(batch_codes)  # from the version's obs, read and checked once
        self.n_genes = n_genes

    def __len__(self) -> int:
        """Return the number of committed cells."""
        return len(self.joinids)

    def read(self, positions: np.ndarray) -> CellData:
        """Read counts and batch indices of the cells at ``positions`` (in atlas order).

        Many cells (a training block) are read ``READ_CELLS`` at a time: a read's coordinates,
        its conversion to CSR and its checks take several times the cells' own size.
        """
        positions = np.asarray(positions, dtype=np.int64)
        pieces = []
        for s in range(0, max(len(positions), 1), READ_CELLS):
            ids = self.joinids[positions[s : s + READ_CELLS]]
            counts = self.cells.read_counts(ids, self.n_genes)
            self.checks.verify(ids, counts=counts)
            pieces.append(counts)
        counts = pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
        return CellData(counts, self.batch_codes[positions])


class VersionCells:
    """Every cell of a version being built: the committed ones in the store, then the new ones in memory."""

    def __init__(self, stored: StoredCells, new: CellData) -> None:
        self.stored, self.new = stored, new

    def __len__(self) -> int:
        """Return the number of cells of the version: the committed ones plus the new ones."""
        return len(self.stored) + len(self.new)

    def read(self, positions: np.ndarray) -> CellData:
        """Read counts and batch indices of the cells at ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        old = positions < len(self.stored)
        if old.all():
            return self.stored.read(positions)
        if not old.any():
            return self.new.read(positions - len(self.stored))
        a, b = self.stored.read(positions[old]), self.new.read(positions[~old] - len(self.stored))
        order = np.argsort(np.concatenate([np.flatnonzero(old), np.flatnonzero(~old)]), kind="stable")
        return CellData(sp.vstack([a.counts, b.counts]).tocsr()[order], np.concatenate([a.batch, b.batch])[order])


# ----------------------------------------------------------------------------- results
@dataclass
class Committed:
    """A version just committed: the new manifest and everything computed for it."""

    store: AtlasStore
    manifest: Manifest
    info: VersionInfo
    cell_obs: pd.DataFrame
    files: VersionFiles
    new_cells: np.ndarray
    train: TrainResult
    prepared: PreparedInput

    def reader(self) -> VersionReader:
        """Return a reader of the new version that holds what was computed (nothing is read back)."""
        reader = VersionReader(self.store, self.manifest, self.info.number)
        reader.remember(cell_obs=self.cell_obs, latent=self.files.latent, index=self.files.index,
                        calibration=self.files.calibration, predictions=self.files.predictions)
        return reader


@dataclass
class _Plan:
    """What a version is made of before its model is trained."""

    store: AtlasStore
    manifest: Manifest  # datasets include the new one; versions end at the parent
    number: int
    parent: VersionReader | None
    record: DatasetRecord
    prepared: PreparedInput
    batches: list[str]
    config: AtlasConfig
    continual: ContinualConfig
    run_config: dict[str, Any]
    runtime: RuntimeConfig
    lock: WriteLock | None = None  # the ingest's write lock (a create writes in a private folder)
    started_from: str | None = None  # digest of the manifest the ingest started from

    def new_cells(self) -> CellData | StoredCells:
        """Return the new cells: in memory, or (a streamed input) read back from their fresh range of the store."""
        codes = pd.Index(self.batches).get_indexer(self.prepared.obs["batch"])
        if not self.prepared.streamed:
            return CellData(self.prepared.counts, codes)
        sums = self.prepared.counts_checksums
        zeros = np.zeros(len(sums), dtype=np.uint64)
        checks = CellChecks([(self.record.joinid_start, self.record.joinid_stop, self.record.name)],
                            np.column_stack([zeros, sums, zeros]))
        return StoredCells(self.store.cells, checks, codes, self.manifest.n_genes)

    def stored_cells(self) -> StoredCells:
        if self.parent is None:
            return StoredCells(self.store.cells, CellChecks([], np.zeros((0, 3), np.uint64)), np.zeros(0, np.int64),
                               self.manifest.n_genes)
        codes = pd.Index(self.batches).get_indexer(self.parent.cell_obs()["batch"])
        return StoredCells(self.store.cells, self.parent.cell_checks(), codes, self.manifest.n_genes)


# ----------------------------------------------------------------------------- create
@dataclass
class Pretrained:
    """A reference model trained elsewhere (an scvi-tools SCVI): its weights, genes, batch order and origin."""

    module: CVAE
    genes: list[str]
    batches: list[str]
    origin: dict[str, Any]


def create(
    root: Path,
    adata: ad.AnnData | SomaInput,
    *,
    batch_key: str,
    label_key: str,
    dataset: str,
    layer: str | None,
    config: AtlasConfig,
    runtime: RuntimeConfig,
    pretrained: Pretrained | None = None,
) -> Committed:
    """Train the reference model on ``adata`` (or take ``pretrained``) and write version 1 at ``root``.

    The atlas is built beside ``root`` and renamed into place when complete.
    """
    check_atlas_path(root)
    check_runtime(runtime, streamed=is_streamed(adata) and pretrained is None)  # a pretrained model trains nothing
    try:  # the stored settings are every later ingest's defaults
        check_settings("ewc", config.query_training, config.continual)
    except InputError as exc:
        raise InputError(f"the atlas's continual settings would refuse every default (ewc) fold-in: {exc}") from exc
    if root.name in ("", ".."):
        raise InputError(f"the atlas path {root} must end in the name of the new folder (not '..')")
    if root.is_symlink():
        raise InputError(f"{root} is a link: an atlas is built beside its path and renamed into place, which would "
                         "replace the link; give the folder it points to, or a new path")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InputError(f"{root} already exists; choose a new path or open it with Atlas.open")
    if not isinstance(label_key, str):
        raise InputError(f"label_key must name the obs column of the reference's cell types (got {label_key!r}): "
                         "the atlas labels every query from it")
    genes = pretrained.genes if pretrained else None
    source = as_input(adata)
    prep = prepare_input(source, batch_key=batch_key, label_key=label_key, layer=layer, dataset=dataset,
                         atlas_genes=genes, min_gene_overlap=1.0 if pretrained else config.continual.min_gene_overlap)
    check_labelled_cells(int(prep.obs["label"].notna().sum()), config.transfer)  # before any training
    prep.metadata = prepare_metadata(source.obs, {})
    genes = genes or [str(g) for g in source.var_names]
    prep.gene_annotations = prepare_gene_columns(source.var, genes)
    batches = prep.batches
    if pretrained is not None:
        unknown = [b for b in prep.batches if b not in pretrained.batches]
        if unknown:
            raise InputError(f"batch value(s) {unknown[:5]} in {batch_key!r} are not among the model's batches "
                             f"{pretrained.batches[:10]}: pass the AnnData the reference was trained on")
        batches = list(pretrained.batches)
    _remove_abandoned_builds(root)
    tmp = root.with_name(f"{CREATING_PREFIX.format(name=root.name)}{uuid.uuid4().hex[:8]}")
    _make_folder(tmp)
    try:
        with WriteLock(tmp, task="a create"):  # held until the rename: the build is private and never taken for abandoned
            committed = _build_reference(AtlasStore(tmp), prep, genes, batches, config, runtime, pretrained,
                                         dataset=dataset, batch_key=batch_key, label_key=label_key)
            _move_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    committed.store = committed.store.moved_to(root)
    return committed


def _build_reference(store: AtlasStore, prep: PreparedInput, genes: list[str], batches: list[str],
                     config: AtlasConfig, runtime: RuntimeConfig, pretrained: Pretrained | None, *, dataset: str,
                     batch_key: str, label_key: str) -> Committed:
    """Write the reference cells into a new cell store, train (or take) the reference model and commit version 1."""
    CellStore.create(str(store.root / "cells"), genes, prep.gene_annotations)
    prep.obs["version_added"] = 1
    start, stop = store.cells.append(prep.obs, _checksummed(prep), prep.metadata.table, prep.metadata.columns)
    record = DatasetRecord(
        name=dataset, version=1, joinid_start=start, joinid_stop=stop, batch_key=batch_key, label_key=label_key,
        batches=batches, genes_matched=prep.genes_matched, genes_padded=0, obs_columns=prep.metadata.columns,
    )
    manifest = Manifest(n_genes=len(genes), label_key=label_key, config=config, datasets=[record])
    run = {"imported": pretrained.origin} if pretrained else {"training": config.reference_training.model_dump()}
    plan = _Plan(store, manifest, 1, None, record, prep, batches, config, config.continual, run, runtime)
    if pretrained is not None:
        module, result = pretrained.module, TrainResult(0, 0.0, 0.0)
    else:
        torch.manual_seed(config.reference_training.seed)  # initial weights follow the seed
        module = CVAE(len(genes), len(batches), config.model)
        result = fit(module, plan.new_cells(), config.reference_training, runtime=runtime, name="training reference")
    return _build_and_commit(plan, module, "reference", result, previous_fisher=None)


def _checksummed(prep: PreparedInput) -> Iterator[sp.csr_matrix]:
    """``prep``'s counts in row parts, recording each cell's counts checksum as its part goes by."""
    sums = []
    for part in prep.count_parts():
        sums.append(counts_checksums(part))
        yield part
    prep.counts_checksums = np.concatenate(sums) if sums else np.zeros(0, dtype=np.uint64)


CREATING_PREFIX = ".{name}.creating-"
"""Where ``create`` builds an atlas before renaming it into place (beside the target)."""


def _remove_abandoned_builds(root: Path) -> None:
    """Remove the build folders of earlier creates of ``root`` whose process ended (killed mid-build).

    A build holds its kernel write lock from start to rename; a folder whose lock file nobody
    holds belongs to a process that died, so the same command simply runs again without the
    half-built copy of the cells staying on disk. A build's lock file exists for an instant
    before its flock is taken, and the holder writes its details only once it holds it: an
    empty lock file younger than ``_FRESH_LOCK_SECONDS`` is a create starting, not a dead one.
    """
    for folder in root.parent.glob(f"{glob.escape(CREATING_PREFIX.format(name=root.name))}*"):
        lock = folder / LOCK_NAME
        if not folder.is_dir() or folder.is_symlink() or not lock.is_file() or lock_holder(folder) is not None:
            continue
        try:
            stat = lock.stat()
        except FileNotFoundError:
            continue
        if stat.st_size == 0 and time.time() - stat.st_mtime < _FRESH_LOCK_SECONDS:
            continue
        log.info("removing %s, left by a create that did not finish", folder)
        shutil.rmtree(folder, ignore_errors=True)


_FRESH_LOCK_SECONDS = 60.0
"""How long an empty, unheld build lock file counts as a create that is just taking it."""


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise AtlasWriteError(f"cannot create {path}: {exc.strerror}; nothing was written") from exc


def _move_into_place(built: Path, root: Path) -> None:
    """Rename the finished atlas to ``root``; refuse if another process created ``root`` meanwhile."""
    try:
        if root.exists():
            root.rmdir()  # an empty folder the user made; a non-empty one raises
        built.rename(root)
        fsync_dir(root.parent)
    except OSError as exc:
        raise InputError(
            f"{root} was created by another process while this create ran ({exc.strerror}); this create's atlas "
            "was discarded and the other one left as it is"
        ) from exc


# ----------------------------------------------------------------------------- ingest
def ingest(
    store: AtlasStore,
    adata: ad.AnnData | SomaInput,
    *,
    batch_key: str,
    strategy: FoldInStrategy,
    label_key: str | None,
    dataset: str | None,
    layer: str | None,
    training: TrainingConfig,
    continual: ContinualConfig,
    runtime: RuntimeConfig,
) -> Committed:
    """Fold ``adata`` into the atlas at ``store`` as the version after its newest one."""
    check_runtime(runtime, streamed=is_streamed(adata))
    check_settings(strategy, training, continual, runtime=runtime)
    with WriteLock(store.root) as lock:
        manifest, started_from, parent = start_writing(store)
        number = parent.number + 1
        dataset = dataset or f"dataset_v{number}"
        if any(d.name == dataset for d in manifest.datasets):
            raise InputError(f"a dataset named {dataset!r} is already in the atlas; pass dataset=<new name>")
        source = as_input(adata)
        prep = prepare_input(
            source, batch_key=batch_key, label_key=label_key, layer=layer, dataset=dataset, atlas_genes=parent.genes(),
            min_gene_overlap=continual.min_gene_overlap, existing_batches=parent.info.batches, new_batches_only=True,
        )
        _refuse_known_cell_names(store.cells, parent.ranges(), prep.obs["obs_id"])
        prep.metadata = prepare_metadata(source.obs, manifest.obs_columns())
        manifest, started_from, parent = tidy(store, manifest, started_from, parent)
        batches = [*parent.info.batches, *prep.batches]
        prep.obs["version_added"] = number
        lock.check_held()  # a writer whose lock file was deleted must not write cells beside the next one
        with cells_removed_on_failure(store):
            start, stop = store.cells.append(prep.obs, _checksummed(prep), prep.metadata.table, prep.metadata.columns)
            fault_point("after_cells")
            record = DatasetRecord(
                name=dataset, version=number, joinid_start=start, joinid_stop=stop, batch_key=batch_key,
                label_key=label_key, batches=prep.batches, genes_matched=prep.genes_matched, genes_padded=prep.genes_padded,
                obs_columns=prep.metadata.columns,
            )
            run_config = {"training": training.model_dump(), "continual": continual.model_dump(), "strategy": strategy}
            plan = _Plan(store, manifest.model_copy(update={"datasets": [*manifest.datasets, record]}), number, parent,
                         record, prep, batches, manifest.config, continual, run_config, runtime, lock, started_from)
            ck = parent.checkpoint()
            module = CVAE(manifest.n_genes, len(parent.info.batches), manifest.config.model)
            module.load_state_dict(ck.weights)
            module.add_batches(len(prep.batches), seed=training.seed)
            replay = None
            if strategy == "ewc":
                replay = _replay_sample(plan.stored_cells(), continual.replay_max_cells, training.seed)
            log.debug("folding in %d cells with %s", prep.n_cells, strategy)
            fault_point("training")
            previous = AccumulatedFisher(ck.fisher, ck.fisher_cells)
            result = fold_in(module, strategy, plan.new_cells(), n_old_batches=len(parent.info.batches),
                             training=training, continual=continual, fisher=previous, anchor=ck.anchor, replay=replay,
                             runtime=runtime)
            return _build_and_commit(plan, module, strategy, result, previous_fisher=previous)


@contextmanager
def cells_removed_on_failure(store: AtlasStore) -> Iterator[None]:
    """Under the write lock: if the block fails, delete the cells it wrote that no committed manifest lists.

    The committed manifest is read again from disk, so cells a commit that did happen lists
    stay. A write killed outright (no cleanup runs) leaves them to the next writer's :func:`tidy`.
    A failure of the cleanup itself is logged; the block's own error is what propagates.
    """
    try:
        yield
    except BaseException:
        try:
            store.cells.remove_uncommitted(committed_stop(store.read_manifest()))
        except Exception as exc:  # noqa: BLE001 - the original error matters more; the next writer tries again
            log.warning("could not delete the cells of the failed write (the next write will): %s", exc)
        raise


def committed_stop(manifest: Manifest) -> int:
    """One past the last joinid a committed dataset holds (0 for none)."""
    return max((d.joinid_stop for d in manifest.datasets), default=0)


def start_writing(store: AtlasStore) -> tuple[Manifest, str, VersionReader]:
    """Under the write lock: read the manifest; nothing is changed on disk.

    Returns the manifest, its digest (what the commit checks against) and a reader of its newest
    version. The caller checks its input, then calls :func:`tidy` before it writes.
    """
    started_from = store.manifest_digest()
    manifest = store.read_manifest()  # another writer may have committed since the caller opened it
    return manifest, started_from, VersionReader(store, manifest)


def tidy(store: AtlasStore, manifest: Manifest, started_from: str,
         parent: VersionReader) -> tuple[Manifest, str, VersionReader]:
    """Under the write lock, once the input is accepted: remove leftovers, check the layout, rebuild damaged drift.

    Leftovers are what failed writes staged, the cells they wrote to the cell store, and the
    files a committed upgrade replaced but did not get to delete.

    A refused input leaves the atlas byte for byte as it was, leftovers included. Returns the
    manifest, digest and reader to go on from (new ones if a drift part was rebuilt).
    """
    store.remove_uncommitted(manifest)
    store.cells.remove_uncommitted(committed_stop(manifest))
    store.remove_superseded(manifest)
    store.check_writable_layout(manifest.current + 1)
    repaired = rebuild_drift(store, parent)
    if repaired is None:
        return manifest, started_from, parent
    # a part recorded elsewhere (an upgrade's drift/format9/) is rebuilt at the version's own path: the
    # old file is recorded before the commit and deleted after it, as an upgrade's replaced files are
    store.record_superseded(listed_paths(manifest) - listed_paths(repaired))
    store.commit(repaired, expected=started_from)
    store.remove_superseded(repaired)
    return repaired, store.manifest_digest(), VersionReader(store, repaired)


def _refuse_known_cell_names(cells: CellStore, ranges: list[tuple[int, int]], names: pd.Series) -> None:
    """Refuse cell names already in the atlas (read in chunks: memory does not grow with the atlas)."""
    query = pa.array(names.astype(str).tolist(), type=pa.large_string())
    clash: list[str] = []
    for obs in _iter_obs(cells, ranges, ["obs_id"]):
        hit = pc.is_in(pa.array(obs["obs_id"].tolist(), type=pa.large_string()), value_set=query)
        clash += [v for v, h in zip(obs["obs_id"], hit.to_pylist()) if h]
        if len(clash) >= 5:
            break
    if clash:
        raise InputError(f"cell name(s) already in the atlas: {clash[:5]}; cell names must be unique across datasets")


def _iter_obs(cells: CellStore, ranges: list[tuple[int, int]], columns: list[str],
              chunk: int = 200_000) -> Iterator[pd.DataFrame]:
    for a, b in ranges:
        for s in range(a, b, chunk):
            yield cells.read_obs_ids(np.arange(s, min(s + chunk, b)), columns)


def _replay_sample(stored: StoredCells, max_cells: int, seed: int) -> CellData | None:
    """Draw a uniform sample of the atlas's committed cells, read from the store."""
    if max_cells == 0 or len(stored) == 0:
        return None
    return stored.read(sorted_sample(len(stored), max_cells, seed))


# ----------------------------------------------------------------------------- build + commit
def _cell_obs(plan: _Plan) -> pd.DataFrame:
    """Obs of every cell of the new version (index: cell name), as the cell store holds it."""
    new = plan.prepared.obs.copy()
    new["label"] = new["label"].astype(object)
    new["version_added"] = new["version_added"].astype(np.int32)
    new = new.set_index("obs_id")
    new.index.name = "cell"
    if plan.parent is None:
        return new
    return pd.concat([plan.parent.cell_obs(), new[plan.parent.cell_obs().columns]])


def _build_and_commit(
    plan: _Plan, module: CVAE, strategy: str, train: TrainResult, previous_fisher: AccumulatedFisher | None
) -> Committed:
    """Compute the new version's Fisher, embeddings, index, calibration and predictions; commit them."""
    new = plan.new_cells()
    cells = VersionCells(plan.stored_cells(), new)
    n_sample = min(len(new), plan.continual.fisher_max_cells)
    with phase("fisher", total=n_sample, unit="cells", progress=plan.runtime.progress) as p:
        fisher, fisher_info = version_fisher(module, new, plan.continual, previous_fisher, seed=plan.number,
                                             on_cells=p.advance)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    z = embed_cells(module, cells, progress=plan.runtime.progress)
    obs = _cell_obs(plan)
    labelled = obs["label"].notna().to_numpy()
    new_cells = (obs["version_added"] == plan.number).to_numpy()
    tcfg = plan.config.transfer
    index = NeighborIndex.build(z[labelled], obs["label"][labelled].astype(str).to_numpy(), tcfg)
    batches = obs["batch"].astype(str).to_numpy()
    calibration = calibrate(index, z[labelled], tcfg, batches[labelled])
    predictions = summary = None
    if plan.parent is not None:
        # the new cells are labelled from the cells the atlas held before: labels that came with
        # them join the index for later queries, never their own predictions
        known = labelled & ~new_cells
        if not (labelled & new_cells).any():
            known_index, known_calibration = index, calibration
        else:
            known_index = NeighborIndex.build(z[known], obs["label"][known].astype(str).to_numpy(), tcfg)
            known_calibration = calibrate(known_index, z[known], tcfg, batches[known])
        predictions = predict(known_index, known_calibration, z[new_cells], tcfg, obs.index[new_cells].tolist(),
                              batches=batches[new_cells])
        summary = transfer_summary(predictions, obs["label"][new_cells], plan.record.name)
    files = VersionFiles(
        checkpoint=Checkpoint(weights, fisher.mean, weights, fisher.cells),
        latent=z,
        run_config={"model": plan.config.model.model_dump(), **plan.run_config},
        index=index,
        calibration=calibration,
        cell_checksums=cell_checksums(plan.prepared.obs, plan.prepared.counts_checksums,
                                      plan.prepared.metadata.table if plan.prepared.metadata else None),
        predictions=predictions,
    )
    info = VersionInfo(
        number=plan.number, strategy=strategy, parent=plan.parent.number if plan.parent else None,
        datasets=[d.name for d in plan.manifest.datasets_until(plan.number)], n_cells=len(z),
        n_new_cells=int(new_cells.sum()), batches=plan.batches, labels=sorted(set(obs["label"][labelled].astype(str))),
        training={**train.summary(), "fisher_seconds": fisher_info["seconds"]}, fisher=fisher_info,
    )
    staged = plan.store.stage()
    try:
        write_version_files(staged, plan.number, files)
        _write_version_drift(plan, staged, info, files, obs, z, summary)
        final, info = _publish_and_commit(plan, staged, info)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # a crash leaves it for the next writer instead
        raise
    return Committed(plan.store, final, info, obs, files, new_cells, train, plan.prepared)


def _write_version_drift(plan: _Plan, staged: Path, info: VersionInfo, files: VersionFiles, obs: pd.DataFrame,
                         z: np.ndarray, summary: pd.DataFrame | None) -> None:
    """Compute how far the atlas's cells moved and stage the rows with the version's files."""
    fault_point("drift")
    with phase("drift", total=1, unit="version", progress=plan.runtime.progress) as p:
        previous = first = None
        if plan.parent is not None:
            previous, first = plan.parent.latent(), plan.parent.first_latent()
        rows = drift_rows(info, files.run_config, obs[["batch", "label", "dataset", "version_added"]], z, previous,
                          first, plan.config.drift, summary)
        write_drift(staged / DRIFT_DIR, rows, plan.number)
        p.advance()


def _publish_and_commit(plan: _Plan, staged: Path, info: VersionInfo) -> tuple[Manifest, VersionInfo]:
    return publish_and_commit(plan.store, plan.manifest, staged, info, plan.started_from, plan.lock)


def publish_and_commit(store: AtlasStore, manifest: Manifest, staged: Path, info: VersionInfo,
                       started_from: str | None, lock: WriteLock | None) -> tuple[Manifest, VersionInfo]:
    """Move the staged version ``info`` into place and switch the manifest, if nobody else committed meanwhile.

    ``manifest`` is the one the new version is added to; ``started_from`` the digest of the
    manifest file the writer read under ``lock``. Returns the committed manifest and record.
    """
    records = store.publish(staged, info.number, expected=started_from)
    info = info.model_copy(update={"files": records})
    final = manifest.model_copy(update={"versions": [*manifest.versions, info]})
    fault_point("before_manifest")
    if lock is not None:
        lock.check_held()
    store.commit(final, expected=started_from)
    return final, info
