"""Continual learning: Fisher information, the EWC penalty and the fold-in strategies."""

from atlasengine.continual.ewc import EWCPenalty
from atlasengine.continual.fisher import AccumulatedFisher, diagonal_fisher, fisher_summary, version_fisher
from atlasengine.continual.strategies import STRATEGIES, FoldInStrategy, NewBatchRowsOnly, fold_in, surgery_mode

__all__ = [
    "AccumulatedFisher",
    "EWCPenalty",
    "FoldInStrategy",
    "STRATEGIES",
    "diagonal_fisher",
    "fisher_summary",
    "fold_in",
    "NewBatchRowsOnly",
    "surgery_mode",
    "version_fisher",
]
