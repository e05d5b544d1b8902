"""Groups of cells the reference could not explain: clusters, their closest known type, their marker genes.

Pure numpy/scipy/scikit-learn: the caller hands in embeddings and counts.

- Clusters: scikit-learn's HDBSCAN on the embedding (no number of groups to choose; cells in no
  dense group are left out, labelled -1).
- Markers: genes ranked by the Wilcoxon rank-sum statistic (as a z-score, the statistic
  scanpy's ``rank_genes_groups(method="wilcoxon")`` ranks by) of the group's log-normalised
  counts against those of the closest type's cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata


def cluster(z: np.ndarray, min_size: int) -> np.ndarray:
    """Return a group number per row of ``z`` (HDBSCAN, groups of at least ``min_size`` rows; -1: no group).

    Groups are numbered by size, largest first; the result does not depend on row order ties.
    """
    from sklearn.cluster import HDBSCAN

    n = len(z)
    if n < max(2, min_size):
        return np.full(n, -1, dtype=np.int64)
    raw = HDBSCAN(min_cluster_size=max(2, min_size), copy=True).fit_predict(np.asarray(z, dtype=np.float64))
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
    (of the mean log-normalised expressions, natural log) and ``pct_group`` / ``pct_other``
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
