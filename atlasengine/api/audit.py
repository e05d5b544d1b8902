"""The drift step of a commit and the audit report, composed from ``atlasengine.drift``.

Drift rows are written before the manifest switch; rows of versions the manifest does not
list are ignored by readers and deleted by the next writer, so the drift tables and the
atlas always agree on which version is current.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlasengine.config import DriftConfig
from atlasengine.drift import (
    DriftStore,
    compute_initial_drift,
    compute_version_drift,
    flags,
    render_report,
    umap_coordinates,
)
from atlasengine.numerics import sorted_sample
from atlasengine.progress import Phase, phase
from atlasengine.store.manifest import VersionInfo
from atlasengine.store.version import VersionReader
from atlasengine.transfer import UNKNOWN, plot_transfer

UNLABELLED = "(unlabelled)"


def key_parameters(config_used: dict[str, Any]) -> dict[str, Any]:
    """Return the settings a reader of the version history needs (the full config is in config.json)."""
    training = config_used.get("training", {})
    out = {k: training.get(k) for k in ("max_epochs", "lr", "batch_size", "seed") if k in training}
    if config_used.get("strategy") == "ewc":
        cont = config_used.get("continual", {})
        out.update({k: cont.get(k) for k in ("ewc_lambda", "replay_fraction", "fisher_gamma")})
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
    }


def transfer_summary(predictions: pd.DataFrame, query_labels: pd.Series, dataset: str) -> pd.DataFrame:
    """Share of each query cell type assigned to each reference label or Unknown."""
    truth = query_labels.reindex(predictions.index).fillna(UNLABELLED).astype(str)
    df = pd.DataFrame({"query_cell_type": truth.to_numpy(), "assigned_label": predictions["label"].astype(str).to_numpy()})
    counts = df.groupby(["query_cell_type", "assigned_label"]).size().rename("n_cells").reset_index()
    counts["share"] = counts["n_cells"] / counts.groupby("query_cell_type")["n_cells"].transform("sum")
    counts.insert(0, "dataset", dataset)
    return counts


def record_drift(
    db_path: Path,
    info: VersionInfo,
    parameters: dict[str, Any],
    obs: pd.DataFrame,
    current: np.ndarray,
    previous: np.ndarray | None,
    first: np.ndarray | None,
    config: DriftConfig,
    summary: pd.DataFrame | None,
) -> None:
    """Compute the drift of the cells that were in the atlas before ``info`` and store it.

    ``obs`` and ``current`` cover every cell of the new version; ``previous`` / ``first`` the
    cells that existed before it (the first rows), under the previous version and under the
    version that added each cell (version 1 for the reference).
    """
    if previous is None:
        tables = compute_initial_drift(info.number, current, obs, config)
    else:
        n = len(previous)
        tables = compute_version_drift(info.number, previous, first, current[:n], obs.iloc[:n], config)
    with DriftStore(db_path) as db:
        db.write_version(version_record(info, parameters), tables, flags(tables, config), summary)


def backfill_drift(reader: VersionReader, db_path: Path) -> None:
    """Record the drift of every version up to ``reader``'s into a new database at ``db_path``."""
    obs_all = reader.obs()
    for info in reader.manifest.versions:
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
        record_drift(db_path, info, reader.run_config(info.number), obs, z, previous, first,
                     reader.manifest.config.drift, summary)


def render_atlas_report(reader: VersionReader, path: str | Path, max_umap_cells: int = 20_000, seed: int = 0,
                        progress: bool | None = None) -> Path:
    """Write the drift audit report of the version ``reader`` reads to ``path``."""
    with phase("report", total=2, unit="steps", progress=progress) as p:
        path = _render(reader, path, max_umap_cells, seed, p)
    return path


def _render(reader: VersionReader, path: str | Path, max_umap_cells: int, seed: int, p: Phase) -> Path:
    with DriftStore(reader.store.drift_path, read_only=True) as db:
        tables = db.report_tables(reader.number)
        cell_drift = db.read("cell_drift", reader.number)
    obs = reader.obs()
    z = reader.latent()
    keep = sorted_sample(len(z), max_umap_cells, seed)
    coords, method = umap_coordinates(z[keep], seed=seed, return_method=True)
    p.advance()
    sub = obs.iloc[keep]
    last = cell_drift[cell_drift["version"] == cell_drift["version"].max()] if len(cell_drift) else cell_drift
    disp = (
        last.set_index("cell")["displacement_aligned_vs_first"].reindex(sub.index).to_numpy()
        if len(last)
        else np.full(len(sub), np.nan)
    )
    umap = pd.DataFrame(
        {
            "x": coords[:, 0],
            "y": coords[:, 1],
            "version_added": sub["version_added"].astype(str).to_numpy(),
            "batch": sub["batch"].astype(str).to_numpy(),
            "label": sub["label"].fillna(UNLABELLED).astype(str).to_numpy(),
            "displacement": disp,
        }
    )
    figures: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for info in reader.manifest.versions:
            preds = reader.predictions(info.number)
            if preds is None or preds.empty:
                continue
            truth = obs["label"].reindex(preds.index).fillna(UNLABELLED).astype(str)
            paths = plot_transfer(preds, truth, Path(tmp) / f"v{info.number}",
                                  novelty_target=reader.manifest.config.transfer.novelty_target)
            for name, file in paths.items():
                figures[f"version {info.number} ({', '.join(info.datasets[-1:])}): {name}"] = Path(file).read_bytes()
    title = f"Drift audit of {reader.store.root.name} (version {reader.number})"
    out = render_report(path, tables, umap, figures, title, umap_method=method)
    p.advance()
    return out


__all__ = ["UNKNOWN", "backfill_drift", "record_drift", "render_atlas_report", "transfer_summary", "version_record"]
