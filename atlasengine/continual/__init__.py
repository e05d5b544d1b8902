"""Continual learning: Fisher information, the EWC penalty and the fold-in strategies."""

from atlasengine.continual.ewc import EWCPenalty
from atlasengine.continual.fisher import accumulate_fisher, diagonal_fisher, fisher_summary
from atlasengine.continual.strategies import STRATEGIES, FoldInStrategy, surgery_mode

__all__ = [
    "EWCPenalty",
    "FoldInStrategy",
    "STRATEGIES",
    "accumulate_fisher",
    "diagonal_fisher",
    "fisher_summary",
    "surgery_mode",
]
