"""The pure torch model: no Lightning, no storage."""

from atlasengine.model.elbo import elbo_gain, negative_elbo
from atlasengine.model.vae import CVAE, CovariateLinear, LossOutput

__all__ = ["CVAE", "CovariateLinear", "LossOutput", "elbo_gain", "negative_elbo"]
