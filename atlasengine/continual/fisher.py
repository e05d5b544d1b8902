"""Diagonal Fisher information of the ELBO from per-cell gradients, and its online accumulation.

``F_i = mean over cells c of (d loss_c / d theta_i)^2``: the per-cell squared gradient (not the
square of a minibatch-mean gradient), averaged so that its scale does not depend on how
many cells were used.

Per-cell squared gradients are summed without materialising one gradient per cell: for a
linear layer the gradient of cell c is the outer product ``delta_c a_c^T`` of its output
gradient and its input, so ``sum_c (delta_c a_c^T)^2 = (delta^2)^T (a^2)``, one matrix product
per minibatch. Batch rows get ``delta_c^2`` at row ``batch_c``; the gene dispersion gets the
per-cell gradient of its (broadcast) value. One forward and one backward pass per minibatch,
exact (the model has no batch norm, so cells do not interact).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from atlasengine.config import ContinualConfig
from atlasengine.model import CVAE, CovariateLinear
from atlasengine.numerics import sorted_sample
from atlasengine.training.data import CellSource

Tensors = dict[str, torch.Tensor]
PER_CELL_MEAN = "per_cell_mean"
"""The stored Fisher is a per-cell mean over ``represented_cells`` cells (format 4 on)."""


class _SquaredGradients:
    """Hooks that add each minibatch's per-cell squared gradients into ``self.sums``."""

    def __init__(self, module: CVAE) -> None:
        self.module = module
        self.sums = {k: torch.zeros_like(p) for k, p in module.named_parameters()}
        self.touched: set[str] = set()
        self.names = {id(m): n for n, m in module.named_modules()}
        self.handles = []
        for mod in module.modules():
            if isinstance(mod, nn.Linear):
                self.handles.append(mod.register_forward_hook(self._linear))
            elif isinstance(mod, CovariateLinear):
                self.handles.append(mod.register_forward_hook(self._covariate))

    def _prefix(self, mod: nn.Module) -> str:
        name = self.names[id(mod)]
        return f"{name}." if name else ""

    def _linear(self, mod: nn.Linear, inputs, output: torch.Tensor) -> None:
        a = inputs[0].detach()
        prefix = self._prefix(mod)

        def on_grad(delta: torch.Tensor) -> None:
            d2 = delta.detach().pow(2)
            self.sums[prefix + "weight"] += d2.T @ a.pow(2)
            self.touched.add(prefix + "weight")
            if mod.bias is not None:
                self.sums[prefix + "bias"] += d2.sum(0)
                self.touched.add(prefix + "bias")

        output.register_hook(on_grad)

    def _covariate(self, mod: CovariateLinear, inputs, output: torch.Tensor) -> None:
        batch = inputs[1]
        known = (batch >= 0).to(output.dtype).unsqueeze(-1)
        key = self._prefix(mod) + "batch_weight"

        def on_grad(delta: torch.Tensor) -> None:
            self.sums[key].index_add_(0, batch.clamp(min=0), delta.detach().pow(2) * known)
            self.touched.add(key)

        output.register_hook(on_grad)

    def add_dispersion(self, theta: torch.Tensor) -> None:
        def on_grad(g: torch.Tensor) -> None:  # d/d px_r = d/d theta * theta
            self.sums["px_r"] += (g.detach() * theta.detach()).pow(2).sum(0)
            self.touched.add("px_r")

        theta.register_hook(on_grad)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _squared_gradient_mean(
    module: CVAE,
    cells: CellSource,
    positions: np.ndarray,
    chunk_size: int,
    seed: int,
    on_cells: Callable[[int], None] | None = None,
    posterior: bool = False,
) -> Tensors:
    """Mean over ``positions`` of each cell's squared gradient of its negative ELBO.

    With ``posterior``, plus each cell's squared score of its posterior q(z | x) at the sampled
    ``z`` (the Fisher information of the encoder's distribution; nonzero for encoder weights only).

    Cells are read ``chunk_size`` at a time; dropout is off; the reparameterisation noise is
    drawn once per cell from ``seed``. Raises when a parameter received no statistic (a layer
    the per-cell hooks do not cover), rather than leaving its Fisher at zero.
    """
    was_training = module.training
    module.eval()
    gen = torch.Generator().manual_seed(seed)
    stats = _SquaredGradients(module)
    elbo_sums = stats.sums
    posterior_sums = {k: torch.zeros_like(v) for k, v in elbo_sums.items()}
    try:
        for s in range(0, len(positions), chunk_size):
            part = cells.read(positions[s : s + chunk_size])
            x = torch.from_numpy(part.counts.toarray())
            b = torch.from_numpy(part.batch)
            eps = torch.randn(len(part), module.config.n_latent, generator=gen)
            out = module.loss(x, b, eps=eps)
            stats.add_dispersion(out.dispersion)
            module.zero_grad(set_to_none=True)
            stats.sums = elbo_sums
            out.per_cell.sum().backward(retain_graph=posterior)
            if posterior:  # the same hooks, a second backward pass: the score of q(z | x) per cell
                stats.sums = posterior_sums
                (-out.posterior_log_prob()).sum().backward()
            if on_cells is not None:
                on_cells(len(part))
    finally:
        stats.remove()
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    missing = sorted(set(elbo_sums) - stats.touched) if len(positions) else []
    if missing:
        raise RuntimeError(
            f"no Fisher statistic for parameter(s) {missing}: the per-cell squared-gradient hooks do not "
            "cover the layer that holds them (continual/fisher.py)"
        )
    n = max(len(positions), 1)
    return {k: (v + posterior_sums[k]) / n for k, v in elbo_sums.items()}


def diagonal_fisher(
    module: CVAE,
    cells: CellSource,
    max_cells: int = 2000,
    chunk_size: int = 256,
    seed: int = 0,
    posterior: bool = False,
) -> Tensors:
    """Per-cell-mean diagonal Fisher of the negative ELBO over (a sample of) ``cells``.

    At most ``max_cells`` cells, a uniform sample drawn with ``seed``, so the cost is bounded
    whatever the atlas size; the reparameterisation noise is drawn from ``seed`` too.

    Parameters
    ----------
    module
        The model, at the weights the Fisher describes.
    cells
        Anything with ``len()`` and ``read(positions) -> CellData`` (a ``CellData`` itself, or
        the cells of an atlas version read from its store).
    max_cells, chunk_size, seed
        Sample size, cells per forward/backward pass, random seed.
    posterior
        Add the Fisher information of the posterior q(z | x) (encoder weights).

    Returns
    -------
    dict of str to torch.Tensor
        One tensor per named parameter, same shapes.
    """
    positions = sorted_sample(len(cells), max_cells, seed)
    return _squared_gradient_mean(module, cells, positions, chunk_size, seed, posterior=posterior)


@dataclass
class AccumulatedFisher:
    """The reference's evidence for the EWC penalty: a per-cell-mean diagonal Fisher and its cell count.

    ``mean`` is the diagonal Fisher of one cell's negative ELBO averaged over the cells the
    atlas represents; ``cells`` is how many cells that is (discounted by ``fisher_gamma`` for
    each later version). The Laplace approximation of those cells' log-likelihood around the
    anchor weights has precision ``cells * mean``.
    """

    mean: Tensors
    cells: float

    def add(self, current: Tensors, n_new: int, gamma: float = 1.0) -> AccumulatedFisher:
        """Add the evidence of ``n_new`` new cells whose per-cell-mean Fisher is ``current`` (online EWC).

        Precisions add up in cells: ``P = gamma * P_old + n_new * F_new``; old tensors are padded
        with zero rows for batch columns they did not have.
        """
        old = gamma * self.cells
        cells = old + n_new
        if cells <= 0:
            return AccumulatedFisher({k: torch.zeros_like(v) for k, v in current.items()}, 0.0)
        mean = {
            k: (old * pad_rows(self.mean[k], v) + n_new * v) / cells if k in self.mean else v * (n_new / cells)
            for k, v in current.items()
        }
        return AccumulatedFisher(mean, float(cells))


def version_fisher(
    module: CVAE,
    new_cells: CellSource,
    config: ContinualConfig,
    previous: AccumulatedFisher | None,
    seed: int,
    on_cells: Callable[[int], None] | None = None,
) -> tuple[AccumulatedFisher, dict[str, Any]]:
    """Compute the accumulated Fisher a new atlas version stores, and its summary.

    The Fisher of the version's new cells is estimated on a uniform sample of at most
    ``config.fisher_max_cells`` of them at the new weights and added, as the evidence of all
    ``len(new_cells)`` cells, to ``config.fisher_gamma`` times the previous evidence: each cell
    is counted once, by the version that added it (online EWC).

    Parameters
    ----------
    module
        The new version's model.
    new_cells
        The cells the version adds (``len()`` and ``read(positions) -> CellData``).
    config
        Sampling, chunking and ``fisher_gamma``.
    previous
        The parent version's accumulated Fisher (None for version 1).
    seed
        Seeds the sample and the reparameterisation noise (the version number).
    on_cells
        Called with the number of cells after each chunk (progress).

    Returns
    -------
    tuple
        ``(fisher, summary)``: the accumulated Fisher, and a JSON-ready dict of its statistics
        with ``kind``, ``represented_cells``, ``new_cells``, ``cells`` (sample size), ``seed``,
        ``gamma`` and ``seconds``.
    """
    start = time.perf_counter()
    positions = sorted_sample(len(new_cells), config.fisher_max_cells, config.fisher_max_cells + seed)
    current = _squared_gradient_mean(module, new_cells, positions, config.fisher_chunk_size, seed, on_cells,
                                     posterior=config.fisher_posterior)
    base = previous if previous is not None else AccumulatedFisher({}, 0.0)
    fisher = base.add(current, len(new_cells), config.fisher_gamma)
    summary = {
        **fisher_summary(fisher.mean),
        "kind": PER_CELL_MEAN,
        "represented_cells": fisher.cells,
        "new_cells": len(new_cells),
        "cells": int(len(positions)),
        "seed": int(seed),
        "gamma": config.fisher_gamma,
        "version": int(seed),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return fisher, summary


def pad_rows(old: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pad ``old`` with zero rows to the shape of ``like`` (new batch columns carry no Fisher)."""
    if old.shape == like.shape:
        return old
    if old.shape[1:] != like.shape[1:] or old.shape[0] > like.shape[0]:
        raise ValueError(f"cannot pad Fisher of shape {tuple(old.shape)} to {tuple(like.shape)}")
    pad = torch.zeros((like.shape[0] - old.shape[0], *old.shape[1:]), dtype=old.dtype)
    return torch.cat([old, pad], dim=0)


def fisher_summary(fisher: Tensors) -> dict[str, float]:
    """Summarise a Fisher in a few numbers (for the version record)."""
    flat = torch.cat([v.flatten() for v in fisher.values()])
    return {
        "mean": float(flat.mean()),
        "max": float(flat.max()),
        "median": float(flat.median()),
        "nonzero_share": float((flat > 0).float().mean()),
        "n_params": int(flat.numel()),
    }
