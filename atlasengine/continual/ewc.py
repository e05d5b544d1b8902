"""The Elastic Weight Consolidation penalty: ``lambda/2 * sum_i F_i (theta_i - theta*_i)^2``."""

from __future__ import annotations

import torch
from torch import nn

from atlasengine.continual.fisher import Tensors, pad_rows


class EWCPenalty:
    """Callable penalty for :class:`~atlasengine.training.TrainingPlan`.

    ``fisher`` and ``anchor_params`` come from the current atlas version; tensors of grown
    batch layers are zero-padded, so new batch columns are free to move.
    """

    def __init__(self, module: nn.Module, fisher: Tensors, anchor_params: Tensors, ewc_lambda: float) -> None:
        self.ewc_lambda = float(ewc_lambda)
        self.terms: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for name, p in module.named_parameters():
            if name not in fisher:
                continue
            f = pad_rows(fisher[name], p.detach())
            a = pad_rows(anchor_params[name], p.detach())
            self.terms.append((name, f.to(p.device), a.to(p.device)))

    def __call__(self, module: nn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        total = None
        for name, f, a in self.terms:
            p = params[name]
            if f.device != p.device:
                f, a = f.to(p.device), a.to(p.device)
            term = (f * (p - a).pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.ewc_lambda * total
