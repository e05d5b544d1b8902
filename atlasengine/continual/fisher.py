"""Diagonal Fisher information of the ELBO from per-cell gradients, and its online accumulation.

``F_i = mean over cells c of (d loss_c / d theta_i)^2``: the per-cell squared gradient (not the
square of a minibatch-mean gradient), averaged so that its scale does not depend on how
many cells were used. Per-cell gradients come from ``torch.func.vmap(grad(...))``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from atlasengine.training.data import CellData

Tensors = dict[str, torch.Tensor]


def diagonal_fisher(
    module: nn.Module,
    data: CellData,
    max_cells: int = 2000,
    chunk_size: int = 64,
    seed: int = 0,
) -> Tensors:
    """Per-cell-mean diagonal Fisher of the negative ELBO over (a sample of) ``data``.

    At most ``max_cells`` cells are used, so the cost is bounded whatever the atlas size.
    Dropout is off; the reparameterisation noise is drawn once per cell from ``seed``.
    """
    was_training = module.training
    module.eval()
    rng = np.random.default_rng(seed)
    n = len(data)
    idx = np.sort(rng.choice(n, size=min(n, max_cells), replace=False)) if n > max_cells else np.arange(n)
    params = {k: v.detach() for k, v in module.named_parameters()}
    n_latent = module.config.n_latent
    gen = torch.Generator().manual_seed(seed)

    def cell_loss(p: Tensors, x: torch.Tensor, b: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, p, (x[None], b[None]), {"eps": eps[None]})
        return out.per_cell.sum()

    per_cell_grads = vmap(grad(cell_loss), in_dims=(None, 0, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in range(0, len(idx), chunk_size):
        rows = idx[s : s + chunk_size]
        x = torch.from_numpy(data.counts[rows].toarray())
        b = torch.from_numpy(data.batch[rows])
        eps = torch.randn(len(rows), n_latent, generator=gen)
        g = per_cell_grads(params, x, b, eps)
        for k in fisher:
            fisher[k] += g[k].pow(2).sum(0)
    module.train(was_training)
    return {k: v / max(len(idx), 1) for k, v in fisher.items()}


def pad_rows(old: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pad ``old`` with zero rows to the shape of ``like`` (new batch columns carry no Fisher)."""
    if old.shape == like.shape:
        return old
    if old.shape[1:] != like.shape[1:] or old.shape[0] > like.shape[0]:
        raise ValueError(f"cannot pad Fisher of shape {tuple(old.shape)} to {tuple(like.shape)}")
    pad = torch.zeros((like.shape[0] - old.shape[0], *old.shape[1:]), dtype=old.dtype)
    return torch.cat([old, pad], dim=0)


def accumulate_fisher(previous: Tensors | None, current: Tensors, gamma: float = 1.0) -> Tensors:
    """Online EWC: ``F_new = gamma * F_old + F_version`` (old tensors zero-padded to new shapes)."""
    if not previous:
        return {k: v.clone() for k, v in current.items()}
    return {k: gamma * pad_rows(previous[k], v) + v if k in previous else v.clone() for k, v in current.items()}


def fisher_summary(fisher: Tensors) -> dict[str, float]:
    """A few numbers describing a Fisher (for the version record)."""
    flat = torch.cat([v.flatten() for v in fisher.values()])
    return {
        "mean": float(flat.mean()),
        "max": float(flat.max()),
        "median": float(flat.median()),
        "nonzero_share": float((flat > 0).float().mean()),
        "n_params": int(flat.numel()),
    }
