"""How well a model explains cells: the per-cell negative ELBO, and the gain of one version over another.

``elbo_gain`` is the third novelty signal (:mod:`atlasengine.transfer.novelty` turns it into a
calibrated p-value): a cell of a type the previous version never saw is explained much better by
the version that folded it in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from atlasengine.errors import InputError
from atlasengine.model.vae import CVAE


@torch.no_grad()
def negative_elbo(model: CVAE, counts: sp.spmatrix | np.ndarray, batch_index: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Per-cell negative ELBO at the posterior mean (eval mode, no sampling noise: deterministic)."""
    m = sp.csr_matrix(counts, dtype=np.float32)
    b = np.asarray(batch_index, dtype=np.int64)
    if len(b) != m.shape[0]:
        raise InputError(f"batch_index has {len(b)} entries for {m.shape[0]} cells")
    was = model.training
    model.eval()
    device = next(model.parameters()).device  # the cells go where the model is
    out = np.empty(m.shape[0])
    try:
        for s in range(0, m.shape[0], chunk):
            x = torch.from_numpy(m[s : s + chunk].toarray()).to(device)
            bt = torch.from_numpy(b[s : s + chunk]).to(device)
            zero = torch.zeros(len(x), model.config.n_latent, dtype=x.dtype, device=device)  # posterior mean, no noise
            out[s : s + chunk] = model.loss(x, bt, eps=zero).per_cell.double().cpu().numpy()
    finally:
        model.train(was)
    return out


def elbo_gain(
    old_model: CVAE,
    new_model: CVAE,
    counts,
    batch_idx_old: np.ndarray | Sequence[np.ndarray],
    batch_idx_new: np.ndarray,
    chunk: int = 2048,
) -> np.ndarray:
    """log(nELBO_old / nELBO_new) per cell: how much better the new version explains it.

    ``counts``: (cells, atlas genes) raw counts (CSR). ``batch_idx_old``: batch input for the
    old model, -1 = zero batch input (how the old version embeds an unseen batch); a list of
    candidate arrays takes the best (smallest) old nELBO per cell. ``batch_idx_new``: the
    cells' batch indices in the new model. The log ratio is scale-free (per-cell nELBO grows
    with library size), so gains are comparable across cells.
    """
    # one array (or list) of indices, or several candidate arrays
    cands = [np.asarray(batch_idx_old)] if np.ndim(batch_idx_old) == 1 else list(batch_idx_old)
    if not cands:
        raise InputError("batch_idx_old: give at least one batch-index array")
    old = np.min([negative_elbo(old_model, counts, c, chunk) for c in cands], axis=0)
    new = negative_elbo(new_model, counts, batch_idx_new, chunk)
    return np.log(np.maximum(old, 1e-12) / np.maximum(new, 1e-12))
