"""Count likelihoods (log-probabilities), parameterised by mean and inverse dispersion."""

from __future__ import annotations

import torch
from torch.nn import functional as F

_EPS = 1e-8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Negative binomial log-probability of counts ``x`` (mean ``mu``, inverse dispersion ``theta``)."""
    log_theta_mu = torch.log(theta + mu + _EPS)
    return (
        theta * (torch.log(theta + _EPS) - log_theta_mu)
        + x * (torch.log(mu + _EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_nb_per_cell(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``log_nb(x, mu, theta).sum(-1)``, with the terms that vanish at x == 0 evaluated only where x > 0.

    ``x * log(mu / (theta + mu))`` and ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` are 0 where ``x == 0``, and
    count matrices are mostly zeros, so this skips most of the costliest work (lgamma forward,
    digamma backward). ``theta`` must have the shape of ``x``.
    """
    log_theta_mu = torch.log(theta + mu + _EPS)
    dense = (theta * (torch.log(theta + _EPS) - log_theta_mu)).sum(-1)
    rows, cols = torch.nonzero(x, as_tuple=True)
    xv, tv = x[rows, cols], theta[rows, cols]
    sparse = xv * (torch.log(mu[rows, cols] + _EPS) - log_theta_mu[rows, cols])  # the x * log(...) term is 0 where x == 0
    return dense.index_add(0, rows, sparse + torch.lgamma(xv + tv) - torch.lgamma(tv) - torch.lgamma(xv + 1))


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor) -> torch.Tensor:
    """Zero-inflated negative binomial log-probability (``pi_logits``: logits of the zero mass)."""
    softplus_pi = F.softplus(-pi_logits)
    log_theta_eps = torch.log(theta + _EPS)
    log_theta_mu_eps = torch.log(theta + mu + _EPS)
    pi_theta_log = -pi_logits + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + _EPS) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    zero = (x < _EPS).to(x.dtype)
    return zero * case_zero + (1 - zero) * case_non_zero
