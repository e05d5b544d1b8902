"""Conditional VAE in plain torch (scVI with scArches settings).

Counts ``x`` are log1p-transformed at the encoder input, the batch is a categorical input to
every layer of encoder and decoder ("encode covariates"), hidden layers use layer norm
without affine parameters and no batch norm, the likelihood is negative binomial (or ZINB)
with a per-gene dispersion and the observed library size.

The one-hot batch input is stored as a separate weight matrix per layer
(``batch_weight``, shape ``(n_batches, n_out)``), which is exactly a linear layer over the
concatenated one-hot input. Adding batches appends rows and keeps every existing weight.

Example:
    >>> import torch
    >>> from atlasengine.model import CVAE
    >>> m = CVAE(n_genes=50, n_batches=2)
    >>> x = torch.poisson(torch.full((4, 50), 2.0)); b = torch.tensor([0, 1, 0, 1])
    >>> m.loss(x, b).loss.shape
    torch.Size([])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from atlasengine.config import ModelConfig
from atlasengine.model.likelihood import log_nb_per_cell, log_zinb


class CovariateLinear(nn.Module):
    """Linear layer over ``[x, onehot(batch)]``, with the batch columns held apart."""

    def __init__(self, n_in: int, n_out: int, n_batches: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        bound = 1.0 / (n_in + n_batches) ** 0.5
        self.batch_weight = nn.Parameter(torch.empty(n_batches, n_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Return ``linear(x)`` plus the row of ``batch_weight`` of each cell's batch (none for batch -1)."""
        # batch index -1 means "no batch column set" (the scArches way to embed an unseen batch)
        known = (batch >= 0).unsqueeze(-1).to(x.dtype)
        return self.linear(x) + self.batch_weight[batch.clamp(min=0)] * known

    def add_batches(self, n_new: int, generator: torch.Generator | None = None) -> None:
        """Append ``n_new`` batch rows; existing rows are kept bit for bit."""
        old = self.batch_weight.data
        bound = 1.0 / (self.linear.in_features + old.shape[0] + n_new) ** 0.5
        # drawn on the CPU (where a seeded generator lives), then placed beside the existing rows
        new = torch.empty(n_new, old.shape[1], dtype=old.dtype).uniform_(-bound, bound, generator=generator)
        new = new.to(old.device)
        self.batch_weight = nn.Parameter(torch.cat([old, new], dim=0))


class CovariateMLP(nn.Module):
    """Stack of covariate-injected layers: linear -> layer norm -> ReLU -> dropout."""

    def __init__(self, n_in: int, n_hidden: int, n_layers: int, n_batches: int, dropout: float) -> None:
        super().__init__()
        dims = [n_in] + [n_hidden] * n_layers
        self.layers = nn.ModuleList(CovariateLinear(a, b, n_batches) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Apply every layer to ``x`` with the batch input ``batch``."""
        for layer in self.layers:
            x = layer(x, batch)
            x = F.layer_norm(x, x.shape[-1:])
            x = F.relu(x)
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x


@dataclass
class LossOutput:
    """Per-minibatch ELBO pieces.

    ``per_cell`` is the negative ELBO of each cell; ``dispersion`` the gene dispersion as the
    likelihood used it, one row per cell (a broadcast view of ``exp(px_r)``, so per-cell
    gradient statistics such as the diagonal Fisher can hook it); ``posterior`` the mean and
    variance of q(z | x) and ``z`` the sample the ELBO used.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    per_cell: torch.Tensor
    dispersion: torch.Tensor
    posterior: tuple[torch.Tensor, torch.Tensor]
    z: torch.Tensor

    def posterior_log_prob(self) -> torch.Tensor:
        """Log-density of each cell's sample ``z`` (held fixed) under its posterior q(z | x), up to a constant.

        Its gradient is the score of the encoder's distribution, whose square averaged over
        cells and samples is the Fisher information of q: how much moving the encoder moves
        the cells' posteriors.
        """
        mean, var = self.posterior
        z = self.z.detach()
        return -0.5 * ((z - mean).pow(2) / var + torch.log(var)).sum(-1)


class CVAE(nn.Module):
    """scVI-style conditional VAE with growable batch input."""

    def __init__(self, n_genes: int, n_batches: int, config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        self.config = cfg
        self.n_genes = n_genes
        self.encoder = CovariateMLP(n_genes, cfg.n_hidden, cfg.n_layers, n_batches, cfg.dropout_rate)
        self.z_mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.z_var = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.decoder = CovariateMLP(cfg.n_latent, cfg.n_hidden, cfg.n_layers, n_batches, 0.0)
        self.px_scale = nn.Linear(cfg.n_hidden, n_genes)
        self.px_r = nn.Parameter(torch.randn(n_genes))
        if cfg.likelihood == "zinb":
            self.px_dropout = nn.Linear(cfg.n_hidden, n_genes)

    @property
    def n_batches(self) -> int:
        """Number of batch (covariate) columns of the model."""
        return self.encoder.layers[0].batch_weight.shape[0]

    def batch_parameter_names(self) -> list[str]:
        """Names of the parameters that hold batch (covariate) columns."""
        return [n for n, _ in self.named_parameters() if n.endswith("batch_weight")]

    def add_batches(self, n_new: int, seed: int = 0) -> None:
        """Append input columns for ``n_new`` batches to every covariate layer."""
        if n_new <= 0:
            return
        gen = torch.Generator().manual_seed(seed)
        for mod in self.modules():
            if isinstance(mod, CovariateLinear):
                mod.add_batches(n_new, gen)

    def encode(self, x: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of z for counts ``x``."""
        h = self.encoder(torch.log1p(x), batch)
        return self.z_mean(h), torch.exp(self.z_var(h)) + 1e-4

    def decode(
        self, z: torch.Tensor, batch: torch.Tensor, library: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Likelihood parameters of counts given ``z``: ``(rate, dispersion, dropout logits or None)``.

        The dispersion is one row per cell, a broadcast view of ``exp(px_r)``: a gradient
        arriving at it is the per-cell gradient of the gene dispersion.
        """
        h = self.decoder(z, batch)
        scale = torch.softmax(self.px_scale(h), dim=-1)
        rate = library * scale
        dropout = self.px_dropout(h) if self.config.likelihood == "zinb" else None
        theta = torch.exp(self.px_r).expand(z.shape[0], -1)
        return rate, theta, dropout

    def loss(
        self,
        x: torch.Tensor,
        batch: torch.Tensor,
        kl_weight: float = 1.0,
        eps: torch.Tensor | None = None,
    ) -> LossOutput:
        """Negative ELBO averaged over cells. ``eps`` fixes the reparameterisation noise."""
        mean, var = self.encode(x, batch)
        if eps is None:
            eps = torch.randn_like(mean)
        z = mean + var.sqrt() * eps
        library = x.sum(-1, keepdim=True)
        rate, theta, dropout = self.decode(z, batch, library)
        if dropout is None:
            rec = -log_nb_per_cell(x, rate, theta)
        else:
            rec = -log_zinb(x, rate, theta, dropout).sum(-1)
        kl = 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var)).sum(-1)
        per_cell = rec + kl_weight * kl
        return LossOutput(per_cell.mean(), rec.mean(), kl.mean(), per_cell, theta, (mean, var), z)

    def forward(self, x: torch.Tensor, batch: torch.Tensor, kl_weight: float = 1.0, eps: torch.Tensor | None = None) -> LossOutput:
        """Compute the same as :meth:`loss` (so ``torch.func.functional_call`` can drive the model)."""
        return self.loss(x, batch, kl_weight, eps)

    @torch.no_grad()
    def latent(self, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Posterior means (the embedding); dropout off."""
        was = self.training
        self.eval()
        try:
            mean, _ = self.encode(x, batch)
        finally:
            self.train(was)
        return mean
