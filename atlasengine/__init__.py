"""atlasengine: a versioned single-cell reference atlas that folds in new datasets with online EWC."""

from atlasengine.api import Atlas, IngestResult
from atlasengine.config import (
    AtlasConfig,
    ContinualConfig,
    DriftConfig,
    ModelConfig,
    TrainingConfig,
    TransferConfig,
)
from atlasengine.errors import (
    AtlasError,
    AtlasFormatError,
    AtlasIntegrityError,
    AtlasLockedError,
    InputError,
    ReadOnlyError,
    TrainingError,
)
from atlasengine.store.manifest import VersionInfo

__version__ = "0.1.0"

__all__ = [
    "Atlas",
    "AtlasConfig",
    "AtlasError",
    "AtlasFormatError",
    "AtlasIntegrityError",
    "AtlasLockedError",
    "ContinualConfig",
    "DriftConfig",
    "IngestResult",
    "InputError",
    "ModelConfig",
    "ReadOnlyError",
    "TrainingConfig",
    "TrainingError",
    "TransferConfig",
    "VersionInfo",
]
