"""Drift tracking: how far reference cells move between model versions.

The measures are stored as Parquet parts, queried with DuckDB in memory, and summarised in an HTML audit report. Depends only on
numpy/pandas/faiss/duckdb/plotly and the core modules ``atlasengine.config``, ``.errors``,
``.numerics`` and ``.faults``.
"""

from atlasengine.drift.db import VERSIONED_TABLES, DriftStore, migrations, migrations_dir, part_name, tables_named_in
from atlasengine.drift.measures import (
    SCOPES,
    DriftTables,
    batch_mixing,
    compute_initial_drift,
    compute_version_drift,
    displacement,
    first_version_mixing,
    flags,
    knn_indices,
    knn_preservation,
    loo_knn_correct,
    missing_labels,
    procrustes_align,
)
from atlasengine.drift.report import QueryView, Report, render_report, umap_coordinates
from atlasengine.drift.summary import Check, unknown_groups, version_checks

__all__ = [
    "SCOPES",
    "Check",
    "QueryView",
    "Report",
    "VERSIONED_TABLES",
    "DriftStore",
    "DriftTables",
    "batch_mixing",
    "first_version_mixing",
    "compute_initial_drift",
    "compute_version_drift",
    "displacement",
    "flags",
    "knn_indices",
    "knn_preservation",
    "loo_knn_correct",
    "migrations",
    "migrations_dir",
    "missing_labels",
    "part_name",
    "procrustes_align",
    "render_report",
    "tables_named_in",
    "umap_coordinates",
    "unknown_groups",
    "version_checks",
]
