"""The pure torch model: no Lightning, no storage."""

from atlasengine.model.vae import CVAE, CovariateLinear, LossOutput

__all__ = ["CVAE", "CovariateLinear", "LossOutput"]
