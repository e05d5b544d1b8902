"""A penalty that holds the reference cells' embeddings, not the weights.

EWC holds each weight in proportion to its Fisher information, whatever the weight does to the
embedding; a weight that the reference's cells need in one direction cannot move in another
that only new cells use. The embedding anchor holds the function instead: on the reference
cells replayed in a minibatch, the squared distance between the posterior means under the
weights being trained and under the current version's weights (a frozen copy), both without
dropout. The encoder stays free to change wherever the reference cells do not see it.
"""

from __future__ import annotations

import copy

import torch

from atlasengine.model import CVAE


class EmbeddingAnchor:
    """``weight * sum_{replayed i} |mean(x_i) - mean_now(x_i)|^2 / n`` over a minibatch of ``n`` cells.

    Replayed cells are those of the ``n_old_batches`` batches the current version already had.
    ``module`` is copied and frozen when the anchor is made: make it before training.

    Example
    -------
    >>> import torch
    >>> from atlasengine.model import CVAE
    >>> m = CVAE(n_genes=5, n_batches=1)
    >>> anchor = EmbeddingAnchor(m, n_old_batches=1, weight=10.0)
    >>> x, b = torch.ones(4, 5), torch.tensor([0, 0, 1, 1])
    >>> m.add_batches(1)
    >>> anchor(m, x, b).item()  # nothing moved yet
    0.0
    >>> with torch.no_grad():
    ...     m.z_mean.bias += 1.0
    >>> round(anchor(m, x, b).item(), 4)  # 2 replayed cells moved by 1 in each of 10 dims, / 4 cells, x 10
    50.0
    """

    def __init__(self, module: CVAE, n_old_batches: int, weight: float) -> None:
        self.weight = float(weight)
        self.n_old_batches = int(n_old_batches)
        self.anchor = copy.deepcopy(module).eval()
        for p in self.anchor.parameters():
            p.requires_grad_(False)

    def __call__(self, module: CVAE, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Return the penalty for the minibatch ``(x, batch)`` at ``module``'s current weights."""
        old = batch.reshape(-1) < self.n_old_batches
        if self.weight == 0.0 or not bool(old.any()):
            return torch.zeros((), device=x.device)
        if next(self.anchor.parameters()).device != x.device:  # the plan moved the module (accelerator)
            self.anchor.to(x.device)
        with torch.no_grad():
            target, _ = self.anchor.encode(x[old], batch[old])
        was = module.training
        module.eval()  # the embedding is the posterior mean without dropout: hold that, not a noisy draw of it
        try:
            mean, _ = module.encode(x[old], batch[old])
        finally:
            module.train(was)
        return self.weight * (mean - target).pow(2).sum() / x.shape[0]
