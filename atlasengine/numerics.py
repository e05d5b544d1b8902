"""Numeric helpers shared by every package: written once, used everywhere.

Example
-------
>>> import numpy as np
>>> sorted_sample(10, 4, seed=0)
array([2, 4, 5, 7])
>>> x = np.array([[0.0], [1.0], [3.0]])
>>> distances, neighbours = self_excluding_knn(x, 1)
>>> neighbours.ravel().tolist(), distances.ravel().tolist()
([1, 0, 1], [1.0, 1.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import pandas as pd

from atlasengine.errors import InputError


def as_matrix(x: np.ndarray, name: str, *, dtype: type = np.float64, d: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous, finite, 2-D (cells x dims) array of ``dtype``.

    Parameters
    ----------
    x
        Anything numpy can turn into an array.
    name
        What ``x`` is, for the error message.
    dtype
        The returned array's type (faiss wants float32).
    d
        The number of columns required, if any.

    Returns
    -------
    numpy.ndarray
        The checked matrix (no copy when ``x`` already is one).

    Raises
    ------
    InputError
        When ``x`` is not 2-D, not numeric, has the wrong width or holds NaN or inf.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (cells x dims), got shape {arr.shape}")
    if d is not None and arr.shape[1] != d:
        raise InputError(f"{name} has {arr.shape[1]} dimensions, expected {d}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return arr


def same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    """Raise :class:`InputError` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise InputError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def sorted_sample(n: int, max_n: int, seed: int) -> np.ndarray:
    """Sorted positions of a uniform sample of at most ``max_n`` of ``n`` rows.

    All ``n`` positions when ``n <= max_n``; otherwise ``max_n`` drawn without replacement
    with ``numpy.random.default_rng(seed)``. Sorted, so that reads from a store stay in order.
    """
    if n <= max_n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False)).astype(np.int64)


def nested_sample(names: Sequence[str] | np.ndarray | pd.Index, max_n: int, seed: int) -> np.ndarray:
    """Sorted positions of a sample of at most ``max_n`` rows, chosen by each row's name.

    Each name gets a fixed pseudo-random key (a seeded hash of the name) and the ``max_n``
    smallest keys are kept, so the sample does not depend on the rows' order, and when cells
    join, the old cells still sampled are among those sampled before (only cells with smaller
    keys push some out): figures of two versions compare mostly the same cells, where a fresh
    draw would share few. All positions when ``len(names) <= max_n``.

    Example
    -------
    >>> names = [f"cell{i}" for i in range(200)]
    >>> before, after = nested_sample(names[:100], 10, seed=0), nested_sample(names, 10, seed=0)
    >>> set(after[after < 100]) <= set(before)
    True
    """
    names = pd.Index(names).astype(str)
    if len(names) <= max_n:
        return np.arange(len(names), dtype=np.int64)
    keys = pd.util.hash_array(names.to_numpy(dtype=object), hash_key=f"{seed:016d}"[-16:])
    return np.sort(np.argsort(keys, kind="stable")[:max_n]).astype(np.int64)


def drop_self(
    distances: np.ndarray, indices: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own entry from a search for ``k + 1`` neighbours.

    The one self-exclusion rule of the engine: where the row's own position ``own[r]`` is
    among the hits, its first occurrence is dropped (whatever its rank: duplicates of a cell
    may tie with it); where it is not (ties pushed it out, an approximate index missed it, or
    ``own[r] == -1`` for a row that is not indexed) the farthest hit is dropped. Columns are
    padded with missing neighbours (index -1, distance inf) when fewer than ``k + 1`` came back.

    Returns
    -------
    tuple of numpy.ndarray
        ``(distances, indices)`` with ``k`` columns, nearest first.
    """
    d, i = np.asarray(distances), np.asarray(indices)
    own = np.asarray(own, dtype=np.int64)
    if d.shape[1] < k + 1:
        pad = k + 1 - d.shape[1]
        d = np.hstack([d, np.full((len(d), pad), np.inf, dtype=d.dtype)])
        i = np.hstack([i, np.full((len(i), pad), -1, dtype=i.dtype)])
    d, i = d[:, : k + 1], i[:, : k + 1]
    hit = (i == own[:, None]) & (own[:, None] >= 0)
    drop = hit & (np.cumsum(hit, axis=1) == 1)
    drop[~drop.any(axis=1), -1] = True
    return d[~drop].reshape(len(d), k), i[~drop].reshape(len(i), k)


def self_excluding_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k nearest *other* rows of ``x`` (faiss ``IndexFlatL2``).

    ``k`` is capped at ``n - 1``; self is removed by :func:`drop_self`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(distances, indices)``, each ``(n, min(k, n - 1))``, nearest first.
    """
    x = as_matrix(x, "embedding", dtype=np.float32)
    n = x.shape[0]
    k = min(int(k), n - 1)
    if k < 1:
        return np.empty((n, 0), dtype=np.float32), np.empty((n, 0), dtype=np.int64)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d2, found = index.search(x, k + 1)
    d, i = drop_self(np.sqrt(np.maximum(d2, 0.0)), found, np.arange(n), k)
    return d, i.astype(np.int64)
