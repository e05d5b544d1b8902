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

import numpy as np
import torch
from torch import nn

from atlasengine.model import CVAE, CovariateLinear
from atlasengine.training.data import CellData

Tensors = dict[str, torch.Tensor]


class _SquaredGradients:
    """Hooks that add each minibatch's per-cell squared gradients into ``self.sums``."""

    def __init__(self, module: CVAE) -> None:
        self.module = module
        self.sums = {k: torch.zeros_like(p) for k, p in module.named_parameters()}
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
            if mod.bias is not None:
                self.sums[prefix + "bias"] += d2.sum(0)

        output.register_hook(on_grad)

    def _covariate(self, mod: CovariateLinear, inputs, output: torch.Tensor) -> None:
        batch = inputs[1]
        known = (batch >= 0).to(output.dtype).unsqueeze(-1)
        key = self._prefix(mod) + "batch_weight"

        def on_grad(delta: torch.Tensor) -> None:
            self.sums[key].index_add_(0, batch.clamp(min=0), delta.detach().pow(2) * known)

        output.register_hook(on_grad)

    def add_dispersion(self, theta: torch.Tensor) -> None:
        def on_grad(g: torch.Tensor) -> None:  # d/d px_r = d/d theta * theta
            self.sums["px_r"] += (g.detach() * theta.detach()).pow(2).sum(0)

        theta.register_hook(on_grad)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def diagonal_fisher(
    module: CVAE,
    data: CellData,
    max_cells: int = 2000,
    chunk_size: int = 256,
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
    gen = torch.Generator().manual_seed(seed)
    stats = _SquaredGradients(module)
    module.capture = {}
    try:
        for s in range(0, len(idx), chunk_size):
            rows = idx[s : s + chunk_size]
            x = torch.from_numpy(data.counts[rows].toarray())
            b = torch.from_numpy(data.batch[rows])
            eps = torch.randn(len(rows), module.config.n_latent, generator=gen)
            out = module.loss(x, b, eps=eps)
            stats.add_dispersion(module.capture["theta"])
            module.zero_grad(set_to_none=True)
            out.per_cell.sum().backward()
    finally:
        stats.remove()
        module.capture = None
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return {k: v / max(len(idx), 1) for k, v in stats.sums.items()}


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
