"""Label transfer: a faiss neighbour index, scArches weighted kNN, scores and figures.

Pure functions over numpy arrays; depends only on ``atlasengine.config`` and ``atlasengine.errors``.
"""

from atlasengine.transfer.evaluate import detection_scores, evaluate_transfer
from atlasengine.transfer.index import NeighborIndex
from atlasengine.transfer.knn import UNKNOWN, brute_force_knn, label_probabilities, transfer_labels
from atlasengine.transfer.plots import (
    plot_assignment_heatmap,
    plot_novelty_violin,
    plot_transfer,
    plot_uncertainty_violin,
)

__all__ = [
    "UNKNOWN",
    "NeighborIndex",
    "brute_force_knn",
    "detection_scores",
    "evaluate_transfer",
    "label_probabilities",
    "plot_assignment_heatmap",
    "plot_novelty_violin",
    "plot_transfer",
    "plot_uncertainty_violin",
    "transfer_labels",
]
