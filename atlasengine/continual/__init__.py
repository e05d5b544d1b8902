"""Continual learning: Fisher information, the EWC penalty, the embedding anchor and the fold-in strategies."""

from atlasengine.continual.anchor import EmbeddingAnchor
from atlasengine.continual.ewc import EWCPenalty
from atlasengine.continual.fisher import AccumulatedFisher, diagonal_fisher, fisher_summary, version_fisher
from atlasengine.continual.strategies import (
    STRATEGIES,
    FoldInStrategy,
    NewBatchRowsOnly,
    PenaltySum,
    check_settings,
    fold_in,
    surgery_mode,
)

__all__ = [
    "AccumulatedFisher",
    "EWCPenalty",
    "EmbeddingAnchor",
    "FoldInStrategy",
    "STRATEGIES",
    "diagonal_fisher",
    "fisher_summary",
    "fold_in",
    "NewBatchRowsOnly",
    "PenaltySum",
    "check_settings",
    "surgery_mode",
    "version_fisher",
]
