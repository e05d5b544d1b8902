"""The drift step of a commit and the audit report, composed from ``atlasengine.drift``.

A version's drift rows are Parquet parts in its own directory (``drift/<table>.parquet``),
written with its other files before the manifest switch and checksummed like them: the drift
tables and the atlas always agree on which versions exist. Readers load the parts into a
private in-memory DuckDB database; a missing or damaged part is recomputed from the stored
embeddings, and rewritten by the next writer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlasengine.api.outputs import check_output_path
from atlasengine.config import DriftConfig
from atlasengine.drift import (
    VERSIONED_TABLES,
    DriftStore,
    DriftTables,
    QueryView,
    Report,
    compute_initial_drift,
    compute_version_drift,
    flags,
    part_name,
    render_report,
    tables_named_in,
    umap_coordinates,
)
from atlasengine.errors import AtlasIntegrityError
from atlasengine.numerics import sorted_sample
from atlasengine.progress import Phase, phase
from atlasengine.store.atlas_store import AtlasStore
from atlasengine.store.manifest import Manifest, VersionInfo
from atlasengine.store.version import DRIFT_DIR, VersionReader
from atlasengine.transfer import UNKNOWN

log = logging.getLogger("atlasengine")
UNLABELLED = "(unlabelled)"
DriftRows = tuple[dict[str, Any], DriftTables, pd.DataFrame, pd.DataFrame | None]
"""One version's drift: its ``versions`` record, tables, flags and transfer summary."""


def key_parameters(config_used: dict[str, Any]) -> dict[str, Any]:
    """Return the settings a reader of the version history needs (the full config is in config.json)."""
    training = config_used.get("training", {})
    out = {k: training.get(k) for k in ("max_epochs", "lr", "batch_size", "seed") if k in training}
    if config_used.get("strategy") == "ewc":
        cont = config_used.get("continual", {})
        out.update({k: cont.get(k) for k in ("ewc_lambda", "embedding_anchor", "replay_fraction", "fisher_gamma")
                    if k in cont})
    return out


def version_record(info: VersionInfo, parameters: dict[str, Any]) -> dict[str, Any]:
    """Return the ``versions`` row of a version."""
    return {
        "version": info.number,
        "created_at": info.created_at,
        "strategy": info.strategy,
        "parameters": key_parameters(parameters),
        "datasets": info.datasets,
        "n_cells": info.n_cells,
        "n_new_cells": info.n_new_cells,
        "train_seconds": info.training.get("seconds"),
        "fisher_seconds": info.training.get("fisher_seconds"),
        "fisher_mean": info.fisher.get("mean"),
        "fisher_max": info.fisher.get("max"),
        "fisher_nonzero_share": info.fisher.get("nonzero_share"),
        "epochs": info.training.get("epochs"),
        "cells_per_second": info.training.get("cells_per_second"),
        **({"relabel": info.relabel.model_dump(exclude_none=True)} if info.relabel is not None else {}),
    }


def transfer_summary(predictions: pd.DataFrame, query_labels: pd.Series, dataset: str) -> pd.DataFrame:
    """Share of each query cell type assigned to each reference label or Unknown."""
    truth = query_labels.reindex(predictions.index).fillna(UNLABELLED).astype(str)
    df = pd.DataFrame({"query_cell_type": truth.to_numpy(), "assigned_label": predictions["label"].astype(str).to_numpy()})
    counts = df.groupby(["query_cell_type", "assigned_label"]).size().rename("n_cells").reset_index()
    counts["share"] = counts["n_cells"] / counts.groupby("query_cell_type")["n_cells"].transform("sum")
    counts.insert(0, "dataset", dataset)
    return counts


def drift_rows(
    info: VersionInfo,
    parameters: dict[str, Any],
    obs: pd.DataFrame,
    current: np.ndarray,
    previous: np.ndarray | None,
    first: np.ndarray | None,
    config: DriftConfig,
    summary: pd.DataFrame | None,
) -> DriftRows:
    """Compute the drift of the cells that were in the atlas before ``info``: its record, tables, flags, summary.

    ``obs`` and ``current`` cover every cell of the new version; ``previous`` / ``first`` the
    cells that existed before it (the first rows), under the previous version and under the
    version that added each cell (version 1 for the reference).
    """
    if previous is None:
        tables = compute_initial_drift(info.number, current, obs, config)
    else:
        n = len(previous)
        tables = compute_version_drift(info.number, previous, first, current[:n], obs.iloc[:n], config)
    return version_record(info, parameters), tables, flags(tables, config), summary


def write_drift(folder: Path, rows: DriftRows, number: int) -> None:
    """Write one version's drift rows as Parquet parts into ``folder`` (its version directory's ``drift/``)."""
    with DriftStore() as db:
        db.write_version(*rows)
        db.save_version(number, folder)


def stored_drift_rows(reader: VersionReader, info: VersionInfo) -> DriftRows:
    """Recompute version ``info``'s drift rows from the embeddings and predictions stored with the atlas.

    Labels are those of version ``info`` itself: a later relabel does not rewrite its history.
    """
    obs_all = (reader if info.number == reader.number else VersionReader(reader.store, reader.manifest, info.number)).obs()
    z = reader.latent(info.number)
    obs = obs_all.iloc[: len(z)][["batch", "label", "dataset", "version_added"]]
    previous = first = None
    if info.parent is not None:
        previous, first = reader.latent(info.parent), reader.first_latent(info.parent)
    summary = None
    preds = reader.predictions(info.number)
    if preds is not None:
        new = obs_all.index[obs_all["version_added"] == info.number]
        summary = transfer_summary(preds, obs_all.loc[new, "label"], info.datasets[-1])
    return drift_rows(info, reader.run_config(info.number), obs, z, previous, first, reader.manifest.config.drift,
                      summary)


def drift_parts(reader: VersionReader, info: VersionInfo, tables: Sequence[str] = VERSIONED_TABLES) -> list[Path]:
    """Return the checksummed drift parts of ``tables`` for version ``info`` (:class:`AtlasIntegrityError` if bad)."""
    return [reader.file(f"{DRIFT_DIR}/{part_name(t)}", info.number) for t in tables]


def drift_store(reader: VersionReader, tables: Sequence[str] = VERSIONED_TABLES) -> DriftStore:
    """Return an in-memory drift store holding ``tables`` for every version up to ``reader``'s.

    Each version's parts are checked against their checksums; a version whose part is missing
    or damaged has its rows recomputed from the stored embeddings (a warning says so; the next
    ingest writes them back), never left out.
    """
    db = DriftStore()
    try:
        for info in reader.manifest.versions:
            try:
                parts = drift_parts(reader, info, tables)
            except AtlasIntegrityError as exc:
                log.warning("%s: the drift rows of version %d are recomputed from its stored embeddings", exc,
                            info.number)
                db.write_version(*stored_drift_rows(reader, info))
                continue
            db.load_parts(parts)
    except BaseException:
        db.close()
        raise
    return db


FLAG_COLUMNS = ("is_unknown", "is_novel")
CELLS_TABLE = "cells"
"""The SQL table of every cell of the version: ``cell``, the engine's columns, predictions and the user's columns."""


def cells_table(reader: VersionReader) -> pd.DataFrame:
    """Return every cell of ``reader``'s version as the ``cells`` SQL table sees it (text as strings, flags as booleans).

    Columns: ``cell`` (its name, as in ``cell_drift``), then :meth:`VersionReader.obs`'s columns.
    """
    df = reader.obs()
    for col in df.columns:
        if col in FLAG_COLUMNS:
            df[col] = df[col].astype("boolean")
        elif df[col].dtype == object:  # the engine's and the user's text columns (None: missing)
            df[col] = df[col].astype("string")
    df.index = df.index.astype("string")
    return df.rename_axis("cell").reset_index()


def query_atlas(reader: VersionReader, query: str) -> pd.DataFrame:
    """Run a read-only SQL query over the drift tables and the ``cells`` table of ``reader``'s version."""
    with drift_store(reader, tables_named_in(query)) as db:
        if re.search(rf"\b{CELLS_TABLE}\b", query, flags=re.IGNORECASE):
            db.add_table(CELLS_TABLE, cells_table(reader))
        return db.sql(query, reader.number)


def rebuild_drift(store: AtlasStore, reader: VersionReader) -> Manifest | None:
    """Rewrite the drift parts of committed versions that are missing or fail their checksum.

    Returns the manifest that records the new parts (to commit under the write lock), or None
    when every part was sound.
    """
    versions = []
    for info in reader.manifest.versions:
        try:
            drift_parts(reader, info)
        except AtlasIntegrityError as exc:
            log.warning("%s: rebuilding the drift rows of version %d from its stored embeddings", exc, info.number)
            staged = store.stage()
            write_drift(staged / DRIFT_DIR, stored_drift_rows(reader, info), info.number)
            info = store.replace_files(staged, info)
        versions.append(info)
    if versions == reader.manifest.versions:
        return None
    return reader.manifest.model_copy(update={"versions": versions})


def render_atlas_report(reader: VersionReader, path: str | Path, max_umap_cells: int = 20_000, seed: int = 0,
                        progress: bool | None = None) -> Report:
    """Write the drift audit report of the version ``reader`` reads to ``path``; return it with its checks.

    At most ``max_umap_cells`` cells (a seeded sample) are drawn in the 2-d embedding; the
    report says so.
    """
    path = check_output_path(path, "the report", make_parents=True)
    with phase("report", total=2, unit="steps", progress=progress) as p:
        report = _render(reader, path, max_umap_cells, seed, p)
    return report


def _queries(reader: VersionReader, obs: pd.DataFrame) -> list[QueryView]:
    """Return each version's transfer with the query's own labels (None when it came without)."""
    out = []
    renamed = set(reader.label_overrides()["cell"])
    for info in reader.manifest.versions:
        preds = reader.predictions(info.number)
        if preds is None or preds.empty:
            continue
        annotation = obs["label"].reindex(preds.index)
        touched = preds.index.isin(renamed)
        if touched.any():  # a relabel since named some of them: the labels they came with, as of their version
            own = VersionReader(reader.store, reader.manifest, info.number).cell_obs()["label"]
            annotation[touched] = own.reindex(preds.index[touched]).to_numpy()
        out.append(QueryView(info.number, info.datasets[-1] if info.datasets else f"version {info.number}", preds,
                             annotation if annotation.notna().any() else None))
    return out


def _umap_frame(obs: pd.DataFrame, keep: np.ndarray, coords: np.ndarray, cell_drift: pd.DataFrame,
                queries: list[QueryView]) -> pd.DataFrame:
    """Return the drawn cells: position, names for hover and the columns the colour menu offers."""
    sub = obs.iloc[keep]
    last = cell_drift[cell_drift["version"] == cell_drift["version"].max()] if len(cell_drift) else cell_drift
    disp = (
        last.set_index("cell")["displacement_aligned_vs_first"].reindex(sub.index).to_numpy()
        if len(last)
        else np.full(len(sub), np.nan)
    )
    preds = pd.concat([q.predictions[["label", "predicted_label", "uncertainty", "is_unknown"]] for q in queries]) \
        if queries else pd.DataFrame(columns=["label", "predicted_label", "uncertainty", "is_unknown"])
    preds = preds[~preds.index.duplicated(keep="last")].reindex(sub.index)
    queried = preds["predicted_label"].notna().to_numpy()
    call = np.where(~queried, "reference (no transfer)",
                    np.where(preds["is_unknown"].eq(True).to_numpy(), UNKNOWN, "label assigned"))
    return pd.DataFrame(
        {
            "x": coords[:, 0],
            "y": coords[:, 1],
            "cell": sub.index.astype(str).to_numpy(),
            "label": sub["label"].fillna(UNLABELLED).astype(str).to_numpy(),
            "batch": sub["batch"].astype(str).to_numpy(),
            "version_added": sub["version_added"].astype(str).to_numpy(),
            "predicted": preds["predicted_label"].astype(object).to_numpy(),
            "call": call,
            "uncertainty": preds["uncertainty"].astype(float).to_numpy(),
            "displacement": disp,
        }
    )


def _render(reader: VersionReader, path: str | Path, max_umap_cells: int, seed: int, p: Phase) -> Report:
    with drift_store(reader) as db:
        tables = db.report_tables(reader.number)
        cell_drift = db.read("cell_drift", reader.number)
    obs = reader.obs()
    z = reader.latent()
    keep = sorted_sample(len(z), max_umap_cells, seed)
    coords, method = umap_coordinates(z[keep], seed=seed, return_method=True)
    p.advance()
    queries = _queries(reader, obs)
    umap = _umap_frame(obs, keep, coords, cell_drift, queries)
    name = reader.store.root.name
    out = render_report(path, tables, umap, queries, f"Drift audit of {name} (version {reader.number})",
                        umap_method=method, config=reader.manifest.config.drift, atlas_name=name,
                        version=reader.number, n_cells=len(z))
    p.advance()
    return out


__all__ = ["CELLS_TABLE", "UNKNOWN", "cells_table", "drift_rows", "query_atlas", "drift_store", "rebuild_drift", "render_atlas_report", "stored_drift_rows",
           "transfer_summary", "version_record", "write_drift"]
