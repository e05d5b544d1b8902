"""Lightning training of the model; knows nothing of storage."""

from atlasengine.training.data import CellData
from atlasengine.training.fit import TrainResult, fit
from atlasengine.training.plan import TrainingPlan

__all__ = ["CellData", "TrainResult", "TrainingPlan", "fit"]
