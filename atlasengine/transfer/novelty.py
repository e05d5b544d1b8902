"""Per-cell novelty: is a query cell of a type the reference does not hold?

draft
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from atlasengine.errors import InputError
from atlasengine.transfer.index import NeighborIndex
from atlasengine.transfer.knn import label_probabilities


def conformal_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Upper-tail conformal p-values: (1 + #{calibration >= s}) / (1 + n)."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    n = len(cal)
    return (1.0 + n - np.searchsorted(cal, s, side="left")) / (1.0 + n)


def leave_one_out_knn(index: NeighborIndex, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest *other* indexed cells of the indexed cells themselves: (distances, indices)."""
    d, i = index.search(embeddings, k + 1)
    own = i == np.arange(len(i))[:, None]
    # drop the cell itself; where it was not found (duplicates), drop the farthest
    own[~own.any(axis=1), -1] = True
    keep = ~own
    n = len(i)
    return d[keep].reshape(n, k), i[keep].reshape(n, k)


def knn_distance(distances: np.ndarray, k: int) -> np.ndarray:
    """Mean Euclidean distance to the k nearest reference cells."""
    d = np.asarray(distances, dtype=np.float64)[:, :k]
    return d.mean(axis=1)


def elbo_gain(
    old_model,
    new_model,
    counts,
    batch_old: np.ndarray | list[np.ndarray],
    batch_new: np.ndarray,
    chunk: int = 2048,
) -> np.ndarray:
    """log(nELBO_old / nELBO_new) per cell (nELBO at the posterior mean).

    ``batch_old`` may be a list of candidate batch-index arrays; the smallest old nELBO wins.
    """
    cands = batch_old if isinstance(batch_old, list) else [batch_old]
    out_old = np.full(counts.shape[0], np.inf)
    out_new = np.empty(counts.shape[0])
    with torch.no_grad():
        for s in range(0, counts.shape[0], chunk):
            x = torch.from_numpy(np.asarray(counts[s : s + chunk].toarray(), dtype=np.float32))
            for b in cands:
                bt = torch.as_tensor(np.asarray(b)[s : s + chunk], dtype=torch.long)
                out_old[s : s + chunk] = np.minimum(out_old[s : s + chunk], _nelbo(old_model, x, bt))
            bt = torch.as_tensor(np.asarray(batch_new)[s : s + chunk], dtype=torch.long)
            out_new[s : s + chunk] = _nelbo(new_model, x, bt)
    return np.log(out_old / out_new)


def _nelbo(model, x: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    was = model.training
    model.eval()
    mean, _ = model.encode(x, b)
    out = model.loss(x, b, eps=torch.zeros_like(mean)).per_cell
    model.train(was)
    return out.double().numpy()
