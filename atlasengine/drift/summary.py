"""What the top of the report says: a status per drift check and the groups of cells called Unknown.

Every number here is read from the drift tables (``version_drift``, ``drift_flags``) or from a
transfer's predictions; a status only compares it with its :class:`~atlasengine.config.DriftConfig`
threshold:

- red: the whole version is past the threshold (what ``drift_flags`` records for it);
- amber: the whole version is within it, but some cell type is past it, or the value is within
  20% of the threshold;
- green: neither;
- grey: the tables hold no value for the check (for example iLISI with one batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlasengine.config import DriftConfig

STATUSES = ("green", "amber", "red", "grey")
_ORDER = {"grey": 0, "green": 1, "amber": 2, "red": 3}
NEAR = 0.2
"""A value within this share of its threshold is amber."""


@dataclass(frozen=True)
class Check:
    """One drift check of a version: its value, the threshold it is held to and the status."""

    name: str
    measure: str
    status: str
    value: float
    threshold: float
    above_is_bad: bool
    note: str

    @property
    def rule(self) -> str:
        """Return the threshold as a reader meets it, e.g. ``red above 0.5``."""
        return f"red {'above' if self.above_is_bad else 'below'} {self.threshold:.3g}"


def _status(value: float, threshold: float, above_is_bad: bool, types_flagged: bool) -> str:
    if not np.isfinite(value):
        return "grey"
    if (value > threshold) if above_is_bad else (value < threshold):
        return "red"
    near = value > (1 - NEAR) * threshold if above_is_bad else value < (1 + NEAR) * threshold
    return "amber" if types_flagged or near else "green"


def worst(checks: list[Check]) -> str:
    """Return the worst status among ``checks`` (grey when there is none)."""
    return max((c.status for c in checks), key=_ORDER.__getitem__, default="grey")


def _value(row: pd.Series | None, column: str) -> float:
    if row is None or column not in row.index or pd.isna(row[column]):
        return float("nan")
    return float(row[column])


def _flagged_types(flags: pd.DataFrame | None, version: int, measure: str) -> list[str]:
    if flags is None or flags.empty:
        return []
    hit = flags[(flags["version"] == version) & (flags["measure"] == measure) & flags["cell_type"].notna()]
    return sorted(hit["cell_type"].astype(str).unique())


def _types_note(types: list[str]) -> str:
    if not types:
        return ""
    shown = ", ".join(types[:4]) + (f" and {len(types) - 4} more" if len(types) > 4 else "")
    return f"; past the threshold in cell type{'s' if len(types) > 1 else ''} {shown}"


def mixing_column(batch_drift: pd.DataFrame, version: int) -> str:
    """Return the column :func:`mixing_of_first_batches` reads for ``version``.

    ``ilisi_first_version_mean`` where the version's rows hold it; ``ilisi_mean`` for rows written
    before atlas format 9 (or kept by its upgrade because a file failed its checksum).
    """
    column = "ilisi_first_version_mean"
    rows = batch_drift[batch_drift["version"] == version]
    return column if column in rows.columns and np.isfinite(rows[column].to_numpy(dtype=float)).any() else "ilisi_mean"


def mixing_of_first_batches(batch_drift: pd.DataFrame | None, version: int) -> tuple[float, float]:
    """Normalised iLISI of version 1's cells under version 1 and under ``version``.

    Each batch's ``ilisi_first_version_mean`` counts only version 1's cells as neighbours, so
    batches that joined later neither hide nor fake a fall: two first batches that separate while a
    later batch mixes with each read as separated. Batches are weighted as version 1 sampled
    them; normalised by version 1's batch count, (iLISI - 1) / (batches - 1). Rows without the
    column (drift tables of atlas format 8 or older) fall back to ``ilisi_mean``, whose neighbours
    include later batches' cells. NaN with fewer than two batches in version 1.
    """
    if batch_drift is None or batch_drift.empty:
        return float("nan"), float("nan")
    first = batch_drift[batch_drift["version"] == 1].set_index("batch")
    now = batch_drift[batch_drift["version"] == version].set_index("batch")
    if len(first) < 2 or not first.index.isin(now.index).all():
        return float("nan"), float("nan")
    now = now.loc[first.index]
    column = mixing_column(batch_drift, version)
    weights = first["n_cells_knn"].to_numpy(dtype=float)
    b = first["ilisi_mean"].to_numpy(dtype=float)
    a = now[column].to_numpy(dtype=float)
    sampled = (weights > 0) & np.isfinite(b) & np.isfinite(a)  # a small batch the kNN sample missed has none
    if not sampled.any():
        return float("nan"), float("nan")
    before = np.average(b[sampled], weights=weights[sampled])
    after = np.average(a[sampled], weights=weights[sampled])
    scale = len(first) - 1
    return float((before - 1) / scale), float((after - 1) / scale)


def version_checks(
    version_drift: pd.DataFrame | None, flags: pd.DataFrame | None, config: DriftConfig, version: int,
    batch_drift: pd.DataFrame | None = None,
) -> list[Check]:
    """Return the four checks of ``version``: reference drift, neighbourhood preservation, accuracy, batch mixing.

    Parameters
    ----------
    version_drift
        The ``version_drift`` table (rows of ``version`` and of version 1 are read).
    flags
        The ``drift_flags`` table: its per-cell-type rows of ``version`` make a check amber.
    config
        The thresholds.
    version
        The version the checks describe.
    batch_drift
        The ``batch_drift`` table: batch mixing is measured on version 1's cells among themselves
        (:func:`mixing_of_first_batches`); without it, on the version's whole rows.

    Returns
    -------
    list of Check
        Empty when the table holds no row of ``version``.
    """
    if version_drift is None or version_drift.empty:
        return []
    rows = version_drift[version_drift["version"] == version].set_index("scope")
    if rows.empty:
        return []
    first = rows.loc["vs_first"] if "vs_first" in rows.index else None
    prev = rows.loc["vs_previous"] if "vs_previous" in rows.index else None
    scopes = [(s, r) for s, r in (("previous version", prev), ("version 1", first)) if r is not None]
    baseline = version == 1 or prev is None
    checks = []

    disp = _value(first, "displacement_mean_aligned")
    types = _flagged_types(flags, version, "displacement_mean_aligned")
    note = ("version 1 is the baseline" if baseline
            else f"mean aligned displacement of version 1's cells from where version 1 placed them "
                 f"(from the previous version: {_value(prev, 'displacement_mean_aligned'):.3g})")
    checks.append(Check("Reference drift", "displacement_mean_aligned",
                        _status(disp, config.flag_mean_displacement_aligned, True, bool(types)), disp,
                        config.flag_mean_displacement_aligned, True, note + _types_note(types)))

    pres = {s: _value(r, "knn_preservation_mean") for s, r in scopes}
    value = min(pres.values()) if pres else float("nan")
    types = _flagged_types(flags, version, "knn_preservation_mean")
    note = ("version 1 is the baseline" if baseline
            else "share of each cell's neighbours kept, " + ", ".join(f"vs {s} {v:.3g}" for s, v in pres.items()))
    checks.append(Check("Neighbourhood preservation", "knn_preservation_mean",
                        _status(value, config.flag_knn_preservation_min, False, bool(types)), value,
                        config.flag_knn_preservation_min, False, note + _types_note(types)))

    drops = {s: _value(r, "label_accuracy_compared") - _value(r, "label_accuracy_current") for s, r in scopes}
    finite = [v for v in drops.values() if np.isfinite(v)]
    value = max(finite) if finite else float("nan")
    current = _value(first if first is not None else prev, "label_accuracy_current")
    types = _flagged_types(flags, version, "label_accuracy_drop")
    note = f"leave-one-out kNN label accuracy of the reference cells {current:.3g}"
    if not baseline:
        note += "; drop " + ", ".join(f"vs {s} {v:.3g}" for s, v in drops.items())
    checks.append(Check("Reference accuracy (drop)", "label_accuracy_drop",
                        _status(value, config.flag_label_accuracy_drop, True, bool(types)), value,
                        config.flag_label_accuracy_drop, True, note + _types_note(types)))

    base, now = mixing_of_first_batches(batch_drift, version)
    whose = "version 1's cells among themselves"
    if batch_drift is not None and not batch_drift.empty and mixing_column(batch_drift, version) == "ilisi_mean":
        whose = ("the cells of version 1's batches, every batch's cells counted as neighbours (drift rows written "
                 "before atlas format 9)")
    if not np.isfinite(now):  # no batch table: the whole version's figure (comparable at version 2 only)
        v1 = version_drift[(version_drift["version"] == 1) & (version_drift["scope"] == "vs_first")]
        base = _value(v1.iloc[0], "ilisi_norm_mean") if len(v1) else float("nan")
        now = _value(first if first is not None else prev, "ilisi_norm_mean")
        whose = "the version's cells"
    drop = base - now
    note = (f"normalised iLISI of {whose} (0 = one batch per neighbourhood, "
            f"1 = batches evenly mixed) {now:.3g}, version 1: {base:.3g}; the value is its fall below version 1")
    if not np.isfinite(now):
        note = "iLISI needs at least two batches"
    checks.append(Check("Batch mixing (iLISI fall)", "ilisi_norm_drop",
                        _status(drop, config.flag_ilisi_norm_drop, True, False), drop,
                        config.flag_ilisi_norm_drop, True, note))
    return checks


def unknown_groups(predictions: pd.DataFrame, annotation: pd.Series | None = None,
                   coordinates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Group the cells called Unknown by the label they were nearest to before the cut-off.

    Parameters
    ----------
    predictions
        A transfer's table: ``predicted_label``, ``is_unknown``, ``uncertainty`` and, when there,
        ``novelty``; indexed by cell.
    annotation
        The query's own labels by cell (None or missing values: not annotated).
    coordinates
        ``x``, ``y`` by cell for the cells drawn in the 2-d embedding (any subset).

    Returns
    -------
    pandas.DataFrame
        One row per group, largest first: ``nearest_label``, ``n_cells``, ``share`` (of the
        Unknown cells), ``uncertainty_median``, ``novelty_median``, ``annotated_as`` (the query's
        most common label in the group and its share) and ``x``, ``y`` (median position of
        the group's drawn cells, NaN when none is drawn).
    """
    columns = ["nearest_label", "n_cells", "share", "uncertainty_median", "novelty_median", "annotated_as", "x", "y"]
    unknown = predictions[predictions["is_unknown"].astype(bool)]
    if unknown.empty:
        return pd.DataFrame(columns=columns)
    groups = unknown.groupby(unknown["predicted_label"].astype(str), sort=False)
    out = pd.DataFrame({
        "n_cells": groups.size(),
        "uncertainty_median": groups["uncertainty"].median(),
        "novelty_median": (groups["novelty"].median() if "novelty" in unknown.columns
                           else pd.Series(np.nan, index=groups.size().index)),
    })
    out["share"] = out["n_cells"] / len(unknown)
    notes = {}
    truth = None if annotation is None else annotation.reindex(unknown.index)
    for name, cells in groups.groups.items():
        labels = truth.loc[cells].dropna().astype(str) if truth is not None else pd.Series(dtype=str)
        if labels.empty:
            notes[name] = ""
        else:
            top = labels.value_counts()
            notes[name] = f"{top.index[0]} ({top.iloc[0] / len(cells):.0%})"
    out["annotated_as"] = pd.Series(notes)
    if coordinates is not None and len(coordinates):
        xy = coordinates[["x", "y"]].reindex(unknown.index)
        centre = xy.groupby(unknown["predicted_label"].astype(str).to_numpy()).median()
        out = out.join(centre)
    else:
        out["x"] = out["y"] = np.nan
    out = out.rename_axis("nearest_label").reset_index()
    return out.sort_values(["n_cells", "nearest_label"], ascending=[False, True], ignore_index=True)[columns]
