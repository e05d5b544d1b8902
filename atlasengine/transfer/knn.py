"""Weighted kNN label transfer (scArches) with an uncertainty-based Unknown call.

Example:
    >>> import numpy as np
    >>> d = np.array([[0.0, 1.0, 2.0]])
    >>> label_probabilities(d, np.array([[0, 0, 1]]), 2).round(3)
    array([[0.72, 0.28]])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from atlasengine.config import TransferConfig
from atlasengine.errors import InputError
from atlasengine.numerics import as_matrix
from atlasengine.transfer.index import SEARCH_CHUNK, NeighborIndex

UNKNOWN = "Unknown"


def _kernel_weights(d: np.ndarray, valid: np.ndarray, kernel: str) -> np.ndarray:
    """Unnormalised neighbour weights (n_query, k); invalid neighbours get 0.

    Both kernels are shifted by the nearest valid distance (a per-row constant factor
    that cancels in the normalisation) so the exponentials never all underflow.
    """
    count = valid.sum(axis=1, keepdims=True)
    safe_count = np.maximum(count, 1)
    dz = np.where(valid, d, 0.0)
    dmin = np.where(valid, d, np.inf).min(axis=1, keepdims=True)
    dmin = np.where(np.isfinite(dmin), dmin, 0.0)
    if kernel == "scarches":
        # scArches: exp(-d / (2 / sigma)^2) = exp(-d * sigma^2 / 4); sigma = std of the k distances.
        mean = dz.sum(axis=1, keepdims=True) / safe_count
        var = np.where(valid, (d - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / safe_count
        scaled = (dz - dmin) * var / 4.0  # sigma = 0 -> all weights equal (uniform)
    elif kernel == "gaussian":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
            h = np.nanmedian(np.where(valid, d, np.nan), axis=1, keepdims=True)
        h = np.nan_to_num(h, nan=0.0)
        d2 = dz**2 - dmin**2
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(h > 0, d2 / (2.0 * np.where(h > 0, h, 1.0) ** 2), 0.0)
        # h = 0 is the limit h -> 0+: all weight on the neighbours at the nearest distance.
        scaled = np.where((h == 0) & (dz > dmin), np.inf, scaled)
    else:
        raise InputError(f"unknown kernel {kernel!r}; use 'scarches' or 'gaussian'")
    return np.where(valid, np.exp(-scaled), 0.0)


def label_probabilities(
    distances: np.ndarray,
    neighbor_codes: np.ndarray,
    n_labels: int,
    kernel: Literal["scarches", "gaussian"] = "scarches",
) -> np.ndarray:
    """Per-label probabilities (n_query, n_labels) from each cell's k neighbour distances.

    ``scarches``: weights exp(-d / (2/sigma)^2), sigma the std (ddof 0) of the cell's k
    Euclidean distances, normalised to sum 1; P(label) = summed weight of neighbours
    carrying it (Lotfollahi et al. 2022, ``scarches.utils.knn.weighted_knn_transfer``).
    ``gaussian``: weights exp(-d^2 / (2 h^2)), h the cell's median neighbour distance.
    Neighbours with code -1 or a non-finite distance are ignored; a cell with none left
    gets uniform probabilities.
    """
    d = np.asarray(distances, dtype=np.float64)
    codes = np.asarray(neighbor_codes)
    if d.ndim != 2 or d.shape != codes.shape:
        raise InputError(f"distances {d.shape} and neighbor_codes {codes.shape} must be equal 2-D shapes")
    if n_labels < 1 or (codes.size and codes.max() >= n_labels):
        raise InputError(f"neighbor codes must lie in [0, {n_labels}) (or -1 for missing)")
    valid = (codes >= 0) & np.isfinite(d)
    w = _kernel_weights(d, valid, kernel)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    n_query = d.shape[0]
    rows = np.broadcast_to(np.arange(n_query)[:, None], codes.shape)
    flat = (rows * n_labels + codes)[valid]
    probs = np.bincount(flat, weights=w[valid], minlength=n_query * n_labels).reshape(n_query, n_labels)
    probs[total[:, 0] <= 0] = 1.0 / n_labels
    return probs


def transfer_labels(
    index: NeighborIndex,
    query_embeddings: np.ndarray,
    config: TransferConfig,
    obs_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Predict reference labels for query cells by weighted kNN in the shared embedding.

    Columns: ``label`` (best label, or "Unknown" where ``is_unknown``), ``predicted_label``
    (best label always), ``uncertainty`` = max(1 - p_best, 0), ``is_unknown`` =
    uncertainty > ``config.uncertainty_threshold``, then ``p_<label>`` per reference label.

    Note: scArches' own ``pred_unknown`` calls a cell Unknown when the best *probability*
    is below the threshold, although its docs speak of an *uncertainty* threshold. Here,
    as in the HLCA and the scArches paper, Unknown means uncertainty (1 - p_best) >
    threshold. Ties go to the alphabetically first label, as in scArches. The threshold is
    kept in ``df.attrs["uncertainty_threshold"]``.
    """
    q = as_matrix(query_embeddings, "query_embeddings", dtype=np.float32, d=index.d)
    if obs_names is not None and len(obs_names) != q.shape[0]:
        raise InputError(f"obs_names has {len(obs_names)} entries for {q.shape[0]} query cells")
    n_labels = len(index.categories)
    probs = np.empty((q.shape[0], n_labels))
    for start in range(0, q.shape[0], SEARCH_CHUNK):
        dist, idx = index.search(q[start : start + SEARCH_CHUNK], config.k)
        probs[start : start + SEARCH_CHUNK] = label_probabilities(
            dist, index.neighbor_codes(idx), n_labels, config.kernel
        )
    return prediction_table(probs, index.categories, config, obs_names)


def prediction_table(
    probs: np.ndarray, categories: Sequence[str], config: TransferConfig, obs_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Build the transfer's table from label probabilities (rows: query cells, columns: ``categories``)."""
    n_labels = len(categories)
    cats = np.asarray(categories, dtype=object)
    best = probs.argmax(axis=1) if n_labels else np.zeros(0, dtype=int)
    predicted = cats[best]
    uncertainty = np.clip(1.0 - probs[np.arange(len(best)), best], 0.0, None)
    is_unknown = uncertainty > config.uncertainty_threshold
    df = pd.DataFrame(
        {
            "label": np.where(is_unknown, UNKNOWN, predicted).astype(object),
            "predicted_label": predicted,
            "uncertainty": uncertainty,
            "is_unknown": is_unknown,
        },
        index=pd.Index(obs_names) if obs_names is not None else None,
    )
    p = pd.DataFrame(probs, columns=[f"p_{c}" for c in categories], index=df.index)
    df = pd.concat([df, p], axis=1)
    df.attrs["uncertainty_threshold"] = float(config.uncertainty_threshold)
    return df


def brute_force_knn(
    reference: np.ndarray, labels_codes: np.ndarray, query: np.ndarray, k: int, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact Euclidean kNN in numpy (float64, chunked): (distances, indices, neighbour codes).

    A reference implementation for tests; ties are broken by the lower reference index.
    """
    ref = np.asarray(reference, dtype=np.float64)
    qry = np.asarray(query, dtype=np.float64)
    codes = np.asarray(labels_codes)
    k = min(int(k), ref.shape[0])
    ref_sq = (ref**2).sum(axis=1)
    dist = np.empty((qry.shape[0], k))
    idx = np.empty((qry.shape[0], k), dtype=np.int64)
    for start in range(0, qry.shape[0], chunk_size):
        qc = qry[start : start + chunk_size]
        d2 = np.maximum((qc**2).sum(axis=1)[:, None] + ref_sq[None, :] - 2.0 * qc @ ref.T, 0.0)
        order = np.argsort(d2, axis=1, kind="stable")[:, :k]
        idx[start : start + chunk_size] = order
        dist[start : start + chunk_size] = np.sqrt(np.take_along_axis(d2, order, axis=1))
    return dist, idx, codes[idx]
