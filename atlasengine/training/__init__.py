"""Lightning training of the model, and embedding with it; knows nothing of storage."""

from atlasengine.training.data import CellData, CellSource, iter_chunks, minibatch_split, trained_cells
from atlasengine.training.fit import (
    TrainResult,
    batch_per_process,
    check_runtime,
    default_epochs,
    embed,
    embed_cells,
    fit,
    training_processes,
)
from atlasengine.training.plan import TrainingPlan

__all__ = ["CellData", "CellSource", "TrainResult", "TrainingPlan", "batch_per_process", "check_runtime",
           "default_epochs", "embed", "embed_cells", "fit", "iter_chunks", "minibatch_split", "trained_cells",
           "training_processes"]
