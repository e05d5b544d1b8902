"""Groups of cells the reference could not explain: clusters, their closest known type, their marker genes.

Pure numpy/scipy/scikit-learn: the caller hands in embeddings and counts.

- Clusters: scikit-learn's HDBSCAN on the embedding (no number of groups to choose; cells in no
  dense group are left out, labelled -1). HDBSCAN cannot return one group: when it finds no
  split, or only fragments that leave most of the cells in no group, the cells are grouped
  again by what holds together at the reference's own neighbour distances
  (:func:`neighbour_scale`; the DBSCAN* cut of HDBSCAN's tree there, which may be one group).
  Without that, the 38 Unknown cells of the README's pancreas example
  (34 of them ductal) were all noise; on another machine (AVX-512 kernels) the same example's 37
  (35 ductal) came out as groups of 7 and 6 with 24 cells in none, and naming the first group's 7
  cells named none of the next query's ductal cells. Allowing one group always (not only then)
  merged kang's Unknown monocytes with their neighbours (a group of 89 cells 48% FCGR3A+ against
  HDBSCAN's 59 at 78%); there HDBSCAN leaves 5-13% of the cells in no group.
- Markers: genes ranked by the Wilcoxon rank-sum statistic (as a z-score, the statistic
  scanpy's ``rank_genes_groups(method="wilcoxon")`` ranks by) of the group's log-normalised
  counts against those of the closest type's cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from atlasengine.numerics import sorted_sample


class MarkerTables(dict):
    """Group number -> marker table, comparable with ``==`` (pandas compares ``attrs`` when it prints)."""

    def __eq__(self, other: object) -> bool:
        """Equal when both hold equal tables under the same group numbers."""
        return (isinstance(other, dict) and self.keys() == other.keys()
                and all(isinstance(other[k], pd.DataFrame) and self[k].equals(other[k]) for k in self))

    def __ne__(self, other: object) -> bool:
        """Return the negation of ``==``."""
        return not self == other

    __hash__ = None  # type: ignore[assignment]


def neighbour_scale(z: np.ndarray, k: int = 5, quantile: float = 0.95, max_cells: int = 3000, seed: int = 0) -> float:
    """Return the ``quantile`` of the distance from a cell of ``z`` to its ``k``-th nearest other cell (a sample).

    Given the reference's labelled cells, how far apart neighbouring cells of known types are:
    where :func:`cluster` allows one group, it does not split it below that distance. Searched
    with the engine's neighbour index (exact, IVF for large atlases). NaN for fewer than ``k + 1``
    cells.
    """
    from atlasengine.config import TransferConfig
    from atlasengine.transfer.index import NeighborIndex

    x = np.asarray(z, dtype=np.float32)
    if len(x) <= k:
        return float("nan")
    rows = sorted_sample(len(x), max_cells, seed)
    index = NeighborIndex.build(x, np.zeros(len(x), dtype=str), TransferConfig())
    d, _ = index.search(x[rows], k, exclude=rows)
    return float(np.quantile(d[:, -1], quantile))


def cluster(z: np.ndarray, min_size: int, scale: float | Callable[[], float] = 0.0) -> np.ndarray:
    """Return a group number per row of ``z`` (HDBSCAN, groups of at least ``min_size`` rows; -1: no group).

    HDBSCAN never returns a single group: when the rows are the cells of one new type it calls
    them all noise, or keeps a few dense fragments and calls the rest noise. When more than half
    the rows are in no group, and a ``scale`` is given (the reference's :func:`neighbour_scale`,
    or a function that computes it, called only then), the rows are grouped again by what holds
    together below that distance (the DBSCAN* cut of HDBSCAN's tree, which may give one group),
    and that grouping is kept if it leaves fewer rows out. Groups are numbered by size, largest first.
    """
    from sklearn.cluster import HDBSCAN

    n = len(z)
    if n < max(2, min_size):
        return np.full(n, -1, dtype=np.int64)
    x = np.asarray(z, dtype=np.float64)
    size = max(2, min_size)
    fitted = HDBSCAN(min_cluster_size=size, copy=True).fit(x)
    raw = fitted.labels_
    if (raw < 0).mean() > 0.5:  # no split, or fragments of one population
        epsilon = float(scale() if callable(scale) else scale)
        if np.isfinite(epsilon) and epsilon > 0:
            # the groups that hold together below the reference's scale (DBSCAN* at that cut of
            # HDBSCAN's tree; HDBSCAN's cluster_selection_epsilon would do it, but raises a
            # TypeError under NumPy 2 on some trees, scikit-learn issue 33219)
            cut = fitted.dbscan_clustering(cut_distance=epsilon, min_cluster_size=size)
            if (cut < 0).sum() < (raw < 0).sum():
                raw = cut
    sizes = pd.Series(raw[raw >= 0]).value_counts()
    order = sorted(sizes.index, key=lambda g: (-sizes[g], g))
    renumber = {old: new for new, old in enumerate(order)}
    return np.array([renumber.get(g, -1) for g in raw], dtype=np.int64)


def log_normalise(counts: sp.csr_matrix, target: float = 1e4) -> sp.csr_matrix:
    """Return ``log1p`` of counts scaled to ``target`` per cell (scanpy's ``normalize_total`` + ``log1p``)."""
    m = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    totals = np.asarray(m.sum(axis=1)).ravel()
    scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
    m = sp.diags(scale) @ m
    m.data = np.log1p(m.data)
    return sp.csr_matrix(m)


def rank_markers(group: sp.csr_matrix, other: sp.csr_matrix, genes: Sequence[str], n_top: int = 10) -> pd.DataFrame:
    """Rank genes up in ``group`` against ``other`` (log-normalised rows) by the Wilcoxon rank-sum z-score.

    Returns the ``n_top`` genes with the highest z-scores: ``gene``, ``score`` (z), ``log_fold_change``
    (natural log of the ratio of the mean normalised expressions, ``expm1`` of the rows: a log of
    mean expression, where scanpy's ``rank_genes_groups`` takes ``expm1`` of the mean log) and
    ``pct_group`` / ``pct_other``
    (share of cells expressing the gene).
    """
    a, b = group.toarray(), other.toarray()
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return pd.DataFrame(columns=["gene", "score", "log_fold_change", "pct_group", "pct_other"])
    ranks = rankdata(np.vstack([a, b]), axis=0)
    u = ranks[:n1].sum(axis=0) - n1 * (n1 + 1) / 2
    sd = np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)
    z = (u - n1 * n2 / 2) / sd
    lfc = np.log(np.expm1(a).mean(axis=0) + 1e-9) - np.log(np.expm1(b).mean(axis=0) + 1e-9)
    top = np.argsort(-z, kind="stable")[:n_top]
    return pd.DataFrame({
        "gene": [genes[i] for i in top],
        "score": z[top],
        "log_fold_change": lfc[top],
        "pct_group": (a[:, top] > 0).mean(axis=0),
        "pct_other": (b[:, top] > 0).mean(axis=0),
    })
