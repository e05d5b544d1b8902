"""The three fold-in strategies, as settings on a module that starts from the current weights.

- ``surgery``: only the new batch rows of the covariate layers train (scArches); every old
  weight stays bit-identical (zeroed gradients with Adam and no weight decay give zero updates).
- ``finetune``: every weight trains, no penalty.
- ``ewc``: every weight trains under the EWC penalty, with replayed reference cells.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch

from atlasengine.model import CVAE

FoldInStrategy = Literal["surgery", "finetune", "ewc"]
STRATEGIES: tuple[str, ...] = ("surgery", "finetune", "ewc")


@contextmanager
def surgery_mode(module: CVAE, n_old_batches: int) -> Iterator[None]:
    """Freeze everything but the batch rows ``>= n_old_batches``; restore on exit."""
    batch_names = set(module.batch_parameter_names())
    handles = []
    saved = {n: p.requires_grad for n, p in module.named_parameters()}

    def keep_new_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_old_batches] = 0
        return grad

    try:
        for name, p in module.named_parameters():
            if name in batch_names:
                p.requires_grad_(True)
                handles.append(p.register_hook(keep_new_rows))
            else:
                p.requires_grad_(False)
        yield
    finally:
        for h in handles:
            h.remove()
        for name, p in module.named_parameters():
            p.requires_grad_(saved[name])
