"""Drift measures: how far reference cells move in latent space between model versions.

All functions take numpy arrays of shape (n_cells, n_latent) whose rows are the same cells
in the same order. Neighbour searches use an exact faiss ``IndexFlatL2``; nothing loops over
cells in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from atlasengine.config import DriftConfig
from atlasengine.errors import InputError
from atlasengine.numerics import as_matrix, nested_sample, same_shape, self_excluding_knn

SCOPES = ("vs_previous", "vs_first")


# --------------------------------------------------------------------------- primitives


def knn_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Return the indices (n, min(k, n - 1)) of each row's k nearest other rows.

    Exact L2, self excluded by :func:`atlasengine.numerics.drop_self`.
    """
    return self_excluding_knn(x, k)[1]


def procrustes_align(moved: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rotate/reflect ``moved`` onto ``target`` (orthogonal Procrustes, no scaling).

    Both are centred, the best orthogonal map is applied to ``moved`` and ``target``'s mean is
    added back, so a rigid rotation or translation of the whole embedding is not drift.
    """
    moved = as_matrix(moved, "moved")
    target = as_matrix(target, "target")
    same_shape(moved, target, "moved and target")
    mc = moved - moved.mean(axis=0)
    tmean = target.mean(axis=0)
    u, _, vt = np.linalg.svd(mc.T @ (target - tmean), full_matrices=False)
    return mc @ (u @ vt) + tmean


def displacement(before: np.ndarray, after: np.ndarray, aligned: bool) -> np.ndarray:
    """Per-cell Euclidean distance between two embeddings (after Procrustes when aligned)."""
    before = as_matrix(before, "before")
    after = as_matrix(after, "after")
    same_shape(before, after, "before and after")
    if aligned:
        after = procrustes_align(after, before)
    return np.linalg.norm(after - before, axis=1)


def _overlap_share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row share of ``a``'s entries also in ``b`` (rows hold distinct indices)."""
    if a.shape[1] == 0:
        return np.full(a.shape[0], np.nan)
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    return (both[:, 1:] == both[:, :-1]).sum(axis=1) / a.shape[1]


def knn_preservation(before: np.ndarray, after: np.ndarray, k: int) -> np.ndarray:
    """Per-cell share of its k nearest neighbours (self excluded) under ``before`` kept under ``after``."""
    before = as_matrix(before, "before")
    after = as_matrix(after, "after")
    same_shape(before, after, "before and after")
    return _overlap_share(knn_indices(before, k), knn_indices(after, k))


def missing_labels(labels: np.ndarray | pd.Series) -> np.ndarray:
    """Boolean mask of missing labels (None, NaN or empty string)."""
    s = pd.Series(np.asarray(labels, dtype=object))
    return (s.isna() | (s.astype(str).str.strip() == "")).to_numpy()


def _vote_correct(neighbours: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Whether the majority label of each row's neighbours equals its own.

    Equal counts go to the label whose voters are nearer on the whole (the smaller sum of
    ranks), not to the single nearest neighbour's: the figures of stored versions were made so.
    """
    n, k = neighbours.shape
    if k == 0:
        return np.zeros(n, dtype=bool)
    n_classes = int(codes.max()) + 1
    weights = 1.0 + 1e-6 * np.arange(k, 0, -1)  # tie-break towards nearer neighbours
    votes = np.zeros((n, n_classes))
    np.add.at(votes, (np.repeat(np.arange(n), k), codes[neighbours].ravel()), np.tile(weights, n))
    return votes.argmax(axis=1) == codes


def loo_knn_correct(embedding: np.ndarray, labels: np.ndarray | pd.Series, k: int) -> np.ndarray:
    """Leave-one-out kNN label check per cell: 1.0 correct, 0.0 wrong, NaN for unlabelled cells.

    Unlabelled cells neither vote nor are scored; the majority is over the k nearest labelled
    cells, the cell itself excluded. Use ``np.nanmean`` for the accuracy.
    """
    embedding = as_matrix(embedding, "embedding")
    labels = np.asarray(labels, dtype=object)
    if len(labels) != embedding.shape[0]:
        raise InputError("labels must have one entry per embedding row")
    out = np.full(embedding.shape[0], np.nan)
    keep = ~missing_labels(labels)
    if keep.sum() < 2:
        return out
    codes, _ = pd.factorize(pd.Series(labels[keep]).astype(str))
    out[keep] = _vote_correct(knn_indices(embedding[keep], k), codes)
    return out


def _ilisi(neighbours: np.ndarray, codes: np.ndarray, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
    n, k = neighbours.shape
    if k == 0:
        nan = np.full(n, np.nan)
        return nan, nan
    counts = np.zeros((n, n_batches))
    np.add.at(counts, (np.repeat(np.arange(n), k), codes[neighbours].ravel()), 1.0)
    ilisi = 1.0 / ((counts / k) ** 2).sum(axis=1)
    norm = (ilisi - 1.0) / (n_batches - 1) if n_batches > 1 else np.full(n, np.nan)
    return ilisi, norm


def batch_mixing(
    embedding: np.ndarray, batches: np.ndarray | pd.Series, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell iLISI-style batch mixing and its normalised form.

    Returns ``(ilisi, normalised)``: ilisi is the inverse Simpson index of the batch mix among
    the k nearest neighbours (self excluded), 1 = a single batch, up to n_batches; normalised is
    (ilisi - 1) / (n_batches - 1), NaN when there is only one batch.
    """
    embedding = as_matrix(embedding, "embedding")
    batches = np.asarray(batches, dtype=object)
    if len(batches) != embedding.shape[0]:
        raise InputError("batches must have one entry per embedding row")
    codes, uniques = pd.factorize(pd.Series(batches).astype(str))
    return _ilisi(knn_indices(embedding, k), codes, len(uniques))


# --------------------------------------------------------------------------- tables


@dataclass
class DriftTables:
    """The drift tables of one or more versions (see ``atlasengine.drift.db`` for columns)."""

    version_drift: pd.DataFrame
    celltype_drift: pd.DataFrame
    batch_drift: pd.DataFrame
    cell_drift: pd.DataFrame

    def as_dict(self) -> dict[str, pd.DataFrame]:
        """Table name -> DataFrame."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def concat(parts: list[DriftTables]) -> DriftTables:
        """Stack the tables of several versions."""
        return DriftTables(
            **{
                f.name: pd.concat([getattr(p, f.name) for p in parts], ignore_index=True)
                for f in fields(DriftTables)
            }
        )


@dataclass
class _Knn:
    """kNN-based per-cell figures of one embedding on the subsample."""

    neighbours: np.ndarray
    label_correct: np.ndarray


def _knn_figures(x: np.ndarray, codes: np.ndarray, labelled: np.ndarray, k: int) -> _Knn:
    neighbours = knn_indices(x, k)
    correct = np.full(x.shape[0], np.nan)
    if labelled.all() and len(codes) > 1:
        correct[:] = _vote_correct(neighbours, codes)
    elif labelled.sum() > 1:
        correct[labelled] = _vote_correct(knn_indices(x[labelled], k), codes[labelled])
    return _Knn(neighbours, correct)


def _obs_columns(obs: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    if len(obs) != n:
        raise InputError(f"obs has {len(obs)} rows but the embeddings have {n}")
    if "batch" not in obs.columns:
        raise InputError("obs needs a 'batch' column")
    labels = obs["label"].to_numpy(dtype=object) if "label" in obs.columns else np.full(n, None)
    return obs["batch"].astype(str).to_numpy(dtype=object), labels, obs.index.astype(str)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _group_mean(values: np.ndarray, groups: np.ndarray) -> pd.Series:
    return pd.Series(np.asarray(values, dtype=float)).groupby(groups, sort=True).mean()


def _type_mean(values: np.ndarray, codes: np.ndarray, n_types: int) -> np.ndarray:
    """Per-type mean of ``values`` (1-d, or rows of 2-d), NaN skipped; code -1 is ignored."""
    values = np.asarray(values, dtype=float)
    keep = codes >= 0
    frame = pd.DataFrame(values.reshape(len(codes), -1)[keep])
    means = frame.groupby(codes[keep]).mean().reindex(range(n_types)).to_numpy()
    return means[:, 0] if values.ndim == 1 else means


@dataclass
class _Cells:
    """What every drift table of one call shares: the cells, their labels and the kNN subsample."""

    version: int
    batches: np.ndarray
    cells: pd.Index
    sub: np.ndarray  # the kNN subsample (positions)
    codes: np.ndarray  # label codes on the subsample ("" for unlabelled)
    labelled: np.ndarray  # on the subsample
    type_codes: np.ndarray  # per cell, -1 unlabelled
    type_names: np.ndarray

    @property
    def n(self) -> int:
        return len(self.batches)


def _added_by_version_1(obs: pd.DataFrame) -> np.ndarray:
    """Per row: the cell was added by version 1 (``version_added == 1``; every row without that column)."""
    if "version_added" not in obs.columns:
        return np.ones(len(obs), dtype=bool)
    return pd.to_numeric(obs["version_added"], errors="coerce").to_numpy() == 1


def _cells(version: int, n: int, obs: pd.DataFrame, config: DriftConfig, seed: int) -> _Cells:
    batches, labels, cells = _obs_columns(obs, n)
    missing = missing_labels(labels)
    label_str = np.where(missing, None, pd.Series(labels).astype(str).to_numpy(dtype=object))
    sub = nested_sample(cells, config.max_cells, seed)  # by name: mostly the same cells at every version
    codes, _ = pd.factorize(pd.Series(label_str[sub]).fillna(""))
    type_codes, type_names = pd.factorize(pd.Series(label_str, dtype=object), sort=True)  # -1: unlabelled
    return _Cells(version, batches, cells, sub, codes, ~missing[sub], type_codes, np.asarray(type_names, dtype=object))


def _scope_rows(
    c: _Cells, scope: str, current: np.ndarray, other: np.ndarray, cur: _Knn, cmp: _Knn, ilisi: tuple[np.ndarray, ...]
) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Compute the version row, the cell-type rows and each cell's aligned displacement of one comparison."""
    n_types = len(c.type_names)
    raw = np.linalg.norm(current - other, axis=1)
    # no cell moved (a relabel): exactly 0, not Procrustes round-off
    moved = other if np.array_equal(current, other) else procrustes_align(current, other)
    aligned = np.linalg.norm(moved - other, axis=1)
    pres = _overlap_share(cmp.neighbours, cur.neighbours)
    row = dict(
        version=c.version, scope=scope, n_cells=c.n, n_cells_knn=len(c.sub), n_labelled_knn=int(c.labelled.sum()),
        displacement_mean_raw=float(raw.mean()), displacement_median_raw=float(np.median(raw)),
        displacement_mean_aligned=float(aligned.mean()), displacement_median_aligned=float(np.median(aligned)),
        knn_preservation_mean=_nanmean(pres), label_accuracy_current=_nanmean(cur.label_correct),
        label_accuracy_compared=_nanmean(cmp.label_correct), ilisi_mean=_nanmean(ilisi[0]),
        ilisi_norm_mean=_nanmean(ilisi[1]),
    )

    def type_mean(values: np.ndarray, on_sub: bool = False) -> np.ndarray:
        return _type_mean(values, c.type_codes[c.sub] if on_sub else c.type_codes, n_types)

    sub_types = c.type_codes[c.sub]
    types = pd.DataFrame(
        {
            "version": c.version, "scope": scope, "cell_type": c.type_names,
            "n_cells": np.bincount(c.type_codes[c.type_codes >= 0], minlength=n_types),
            "n_cells_knn": np.bincount(sub_types[sub_types >= 0], minlength=n_types),
            "centroid_shift_raw": np.linalg.norm(type_mean(current) - type_mean(other), axis=1),
            "centroid_shift_aligned": np.linalg.norm(type_mean(moved) - type_mean(other), axis=1),
            "displacement_mean_aligned": type_mean(aligned),
            "knn_preservation_mean": type_mean(pres, on_sub=True),
            "label_accuracy_current": type_mean(cur.label_correct, on_sub=True),
            "label_accuracy_compared": type_mean(cmp.label_correct, on_sub=True),
        },
        columns=list(_CELLTYPE_COLUMNS),
    )
    return row, types, aligned


def first_version_mixing(current: np.ndarray, obs: pd.DataFrame, config: DriftConfig, seed: int = 0) -> pd.Series:
    """Return each batch's mean iLISI of version 1's cells among themselves (``ilisi_first_version_mean``).

    Version 1's cells (``obs["version_added"] == 1``; every cell without that column) are sampled
    on their own, as version 1 sampled them (at most ``config.max_cells``, ``seed``), and their
    neighbours are looked up among that sample only. So the figure is version 1's iLISI of the
    same cells at the same density, whatever joined later: a later batch neither raises it by
    mixing with them nor lowers it by mixing little, and the cells added since do not thin the
    sample. Indexed by batch; empty with fewer than two such cells.

    Example
    -------
    >>> z = np.r_[np.zeros((4, 2)), np.ones((4, 2)) * 9] + np.arange(8)[:, None] * 0.01
    >>> obs = pd.DataFrame({"batch": list("aaaabbbb"), "version_added": [1, 1, 2, 2, 1, 1, 2, 2]})
    >>> first_version_mixing(z, obs, DriftConfig(k=1)).round(3).to_dict()
    {'a': 1.0, 'b': 1.0}
    """
    current = as_matrix(current, "current")
    if len(obs) != current.shape[0] or "batch" not in obs.columns:
        raise InputError("obs needs a 'batch' column and one row per embedding row")
    rows = np.flatnonzero(_added_by_version_1(obs))
    rows = rows[nested_sample(obs.index[rows], config.max_cells, seed)]
    if len(rows) < 2:
        return pd.Series(dtype=float, name="ilisi_first_version_mean")
    batches = obs["batch"].astype(str).to_numpy(dtype=object)[rows]
    ilisi = batch_mixing(current[rows], batches, config.k)[0]
    return _group_mean(ilisi, batches).rename("ilisi_first_version_mean")


def _batch_table(c: _Cells, ilisi: tuple[np.ndarray, ...], first_mixing: pd.Series, prev: np.ndarray,
                 first: np.ndarray) -> pd.DataFrame:
    sub_batches = c.batches[c.sub]
    batch = pd.DataFrame(
        {
            "n_cells": pd.Series(c.batches).value_counts().sort_index(),
            "n_cells_knn": pd.Series(sub_batches).value_counts().sort_index(),
            "ilisi_mean": _group_mean(ilisi[0], sub_batches),
            "ilisi_norm_mean": _group_mean(ilisi[1], sub_batches),
            "ilisi_first_version_mean": first_mixing,
            "displacement_aligned_vs_previous_mean": _group_mean(prev, c.batches),
            "displacement_aligned_vs_first_mean": _group_mean(first, c.batches),
        }
    )
    batch = batch.rename_axis("batch").reset_index()
    batch.insert(0, "version", c.version)
    batch[["n_cells", "n_cells_knn"]] = batch[["n_cells", "n_cells_knn"]].fillna(0).astype("int64")
    return batch


def _first_version_rows(obs: pd.DataFrame) -> np.ndarray | None:
    """Positions of version 1's cells where later cells sit beside them (None: every cell is version 1's)."""
    first = _added_by_version_1(obs)
    return None if first.all() else np.flatnonzero(first)


def _first_version_scope(
    version: int, current: np.ndarray, first: np.ndarray, obs: pd.DataFrame, rows: np.ndarray,
    config: DriftConfig, seed: int,
) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Compute the ``vs_first`` comparison on version 1's cells alone.

    A later cell's first embedding is in the frame of the version that added it, so one
    Procrustes fit (or one neighbour search) over cells of several versions would take a
    rotation between those frames for drift. Version 1's cells share version 1's frame: the
    scope is "the reference as version 1 embedded it", what its name says.
    """
    if len(rows) < 2:
        raise InputError("drift against version 1 needs at least 2 of version 1's cells")
    sub_obs = obs.iloc[rows]
    c = _cells(version, len(rows), sub_obs, config, seed)
    now, then = current[rows], first[rows]
    cur = _knn_figures(now[c.sub], c.codes, c.labelled, config.k)
    bcodes, buniq = pd.factorize(pd.Series(c.batches[c.sub]))
    ilisi = _ilisi(cur.neighbours, bcodes, len(buniq))
    cmp = _knn_figures(then[c.sub], c.codes, c.labelled, config.k)
    return _scope_rows(c, "vs_first", now, then, cur, cmp, ilisi)


def _tables(
    version: int,
    current: np.ndarray,
    compared: dict[str, np.ndarray],
    obs: pd.DataFrame,
    config: DriftConfig,
    seed: int,
) -> DriftTables:
    """Shared body of :func:`compute_version_drift` and :func:`compute_initial_drift`."""
    c = _cells(int(version), current.shape[0], obs, config, seed)
    cur = _knn_figures(current[c.sub], c.codes, c.labelled, config.k)
    bcodes, buniq = pd.factorize(pd.Series(c.batches[c.sub]))
    ilisi = _ilisi(cur.neighbours, bcodes, len(buniq))
    done: list[tuple[np.ndarray, _Knn]] = [(current, cur)]

    def figures(other: np.ndarray) -> _Knn:  # version 2 compares to the same embedding twice
        for seen, result in done:
            if seen is other or np.array_equal(seen, other):
                return result
        done.append((other, _knn_figures(other[c.sub], c.codes, c.labelled, config.k)))
        return done[-1][1]

    first_rows = _first_version_rows(obs)
    vrows, crows, aligned = [], [], {}
    for scope, other in compared.items():
        if scope == "vs_first" and first_rows is not None:
            row, types, part = _first_version_scope(int(version), current, other, obs, first_rows, config, seed)
            aligned[scope] = np.full(c.n, np.nan)
            aligned[scope][first_rows] = part
        else:
            row, types, aligned[scope] = _scope_rows(c, scope, current, other, cur, figures(other), ilisi)
        vrows.append(row)
        crows.append(types)
    nan = np.full(c.n, np.nan)
    prev, first = aligned.get("vs_previous", nan), aligned.get("vs_first", nan)
    cell = pd.DataFrame({"version": c.version, "cell": np.asarray(c.cells, dtype=object),
                         "displacement_aligned_vs_previous": prev, "displacement_aligned_vs_first": first})
    celltype = (pd.concat(crows, ignore_index=True) if len(c.type_names)
                else pd.DataFrame(columns=list(_CELLTYPE_COLUMNS)))
    if "version_added" not in obs.columns and version > 2:  # which cells version 1 added is not known
        first_mixing = pd.Series(dtype=float, name="ilisi_first_version_mean")
    elif _added_by_version_1(obs).all():  # version 1's cells only: the same sample and neighbours as ilisi_mean
        first_mixing = _group_mean(ilisi[0], c.batches[c.sub]).rename("ilisi_first_version_mean")
    else:
        first_mixing = first_version_mixing(current, obs, config, seed)
    return DriftTables(pd.DataFrame(vrows, columns=list(_VERSION_COLUMNS)), celltype,
                       _batch_table(c, ilisi, first_mixing, prev, first), cell)


_VERSION_COLUMNS = (
    "version", "scope", "n_cells", "n_cells_knn", "n_labelled_knn",
    "displacement_mean_raw", "displacement_median_raw",
    "displacement_mean_aligned", "displacement_median_aligned",
    "knn_preservation_mean", "label_accuracy_current", "label_accuracy_compared",
    "ilisi_mean", "ilisi_norm_mean",
)
_CELLTYPE_COLUMNS = (
    "version", "scope", "cell_type", "n_cells", "n_cells_knn",
    "centroid_shift_raw", "centroid_shift_aligned", "displacement_mean_aligned",
    "knn_preservation_mean", "label_accuracy_current", "label_accuracy_compared",
)


def compute_version_drift(
    version: int,
    previous: np.ndarray,
    first: np.ndarray,
    current: np.ndarray,
    obs: pd.DataFrame,
    config: DriftConfig,
    seed: int = 0,
) -> DriftTables:
    """Drift of the cells already in the atlas when ``version`` was made.

    ``previous``, ``first`` and ``current`` embed the same cells (rows aligned with ``obs``:
    columns ``batch``, optional ``label`` and ``version_added``; index = cell names) under the
    previous version, the version that added each cell, and ``version``. ``vs_previous`` compares
    every cell; ``vs_first`` compares version 1's cells alone (``version_added == 1``), each as
    version 1 embedded it, since one alignment over cells first embedded by different models
    would count the rotation between their frames as drift (later cells get NaN there).
    Displacements use every cell of a scope; kNN-based measures (preservation, leave-one-out
    label accuracy, iLISI) use at most ``config.max_cells`` of them, chosen by name
    (:func:`atlasengine.numerics.nested_sample`), so successive versions sample mostly the same cells. The batch table's ``ilisi_first_version_mean`` is the iLISI of version
    1's cells among themselves (:func:`first_version_mixing`); without ``version_added`` it is
    missing (NaN) from version 3 on, where the cells need not all be version 1's.
    """
    current = as_matrix(current, "current")
    previous = as_matrix(previous, "previous")
    first = as_matrix(first, "first")
    same_shape(current, previous, "current and previous")
    same_shape(current, first, "current and first")
    if current.shape[0] < 2:
        raise InputError("drift needs at least 2 cells")
    return _tables(int(version), current, {"vs_previous": previous, "vs_first": first}, obs, config, seed)


def compute_initial_drift(
    version: int, current: np.ndarray, obs: pd.DataFrame, config: DriftConfig, seed: int = 0
) -> DriftTables:
    """Compute the baseline of the first version.

    One ``vs_first`` row with displacement 0, preservation 1, and the leave-one-out label
    accuracy and iLISI of ``current``.
    """
    current = as_matrix(current, "current")
    if current.shape[0] < 2:
        raise InputError("drift needs at least 2 cells")
    tables = _tables(int(version), current, {"vs_first": current}, obs, config, seed)
    zero = {
        "version_drift": [c for c in _VERSION_COLUMNS if c.startswith("displacement")],
        "celltype_drift": ["centroid_shift_raw", "centroid_shift_aligned", "displacement_mean_aligned"],
        "batch_drift": ["displacement_aligned_vs_first_mean"],
        "cell_drift": ["displacement_aligned_vs_first"],
    }
    for name, columns in zero.items():  # exactly 0, not Procrustes round-off
        getattr(tables, name).loc[:, columns] = 0.0
    return tables


# --------------------------------------------------------------------------- flags

FLAG_COLUMNS = ("version", "scope", "cell_type", "measure", "value", "threshold")
FLAG_MIN_CELLS_KNN = 20
"""A cell type's neighbourhood measures are flagged only from this many sampled cells: with 20, one
cell (1/20 = 0.05) cannot alone cross the default label-accuracy-drop threshold of 0.05."""


def _flag_rows(df: pd.DataFrame, config: DriftConfig, per_type: bool) -> list[dict]:
    if df is None or df.empty:
        return []
    df = df.reset_index(drop=True)
    drop = df["label_accuracy_compared"] - df["label_accuracy_current"]
    enough = df["n_cells_knn"] >= FLAG_MIN_CELLS_KNN if per_type else pd.Series(True, index=df.index)
    checks = [
        ("displacement_mean_aligned", df["displacement_mean_aligned"],
         config.flag_mean_displacement_aligned,
         (df["scope"] == "vs_first") & (df["displacement_mean_aligned"] > config.flag_mean_displacement_aligned)),
        ("knn_preservation_mean", df["knn_preservation_mean"], config.flag_knn_preservation_min,
         enough & (df["knn_preservation_mean"] < config.flag_knn_preservation_min)),
        ("label_accuracy_drop", drop, config.flag_label_accuracy_drop,
         enough & (drop > config.flag_label_accuracy_drop)),
    ]
    rows = []
    for measure, values, threshold, hit in checks:
        for i in np.flatnonzero(hit.fillna(False).to_numpy()):
            rows.append(
                dict(
                    version=int(df.at[i, "version"]), scope=str(df.at[i, "scope"]),
                    cell_type=str(df.at[i, "cell_type"]) if per_type else None,
                    measure=measure, value=float(values.iloc[i]), threshold=float(threshold),
                )
            )
    return rows


def flags(tables: DriftTables, config: DriftConfig) -> pd.DataFrame:
    """List the thresholds crossed, one row each.

    Columns: version, scope, cell_type (None = whole version), measure, value, threshold.

    Measures: ``displacement_mean_aligned`` (vs_first only) above
    ``flag_mean_displacement_aligned``; ``knn_preservation_mean`` below
    ``flag_knn_preservation_min``; ``label_accuracy_drop`` (accuracy under the compared embedding
    minus under the current one) above ``flag_label_accuracy_drop``. A cell type's two
    neighbourhood measures need :data:`FLAG_MIN_CELLS_KNN` sampled cells. Where ``vs_previous``
    is the same comparison as ``vs_first`` (version 2, whose previous version is version 1) its
    flags are listed once, under ``vs_first``.
    """
    rows = _flag_rows(tables.version_drift, config, False) + _flag_rows(tables.celltype_drift, config, True)
    rows = [r for r in rows if not (r["scope"] == "vs_previous" and r["version"] == 2)]
    out = pd.DataFrame(rows, columns=list(FLAG_COLUMNS))
    return out.astype({"version": "int64", "value": "float64", "threshold": "float64"})
