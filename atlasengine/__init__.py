"""atlasengine: a versioned single-cell reference atlas that folds in new datasets with online EWC."""

from atlasengine.api import Atlas, IngestResult, SomaInput, example_atlas
from atlasengine.config import (
    AtlasConfig,
    ContinualConfig,
    DriftConfig,
    ModelConfig,
    RuntimeConfig,
    TrainingConfig,
    TransferConfig,
)
from atlasengine.errors import (
    AtlasConflictError,
    AtlasError,
    AtlasFormatError,
    AtlasIntegrityError,
    AtlasLockedError,
    AtlasWriteError,
    InputError,
    ReadOnlyError,
    TrainingError,
)
from atlasengine.store.manifest import VersionInfo
from atlasengine.version import __version__

__all__ = [
    "Atlas",
    "AtlasConfig",
    "AtlasConflictError",
    "AtlasError",
    "AtlasFormatError",
    "AtlasIntegrityError",
    "AtlasLockedError",
    "AtlasWriteError",
    "ContinualConfig",
    "DriftConfig",
    "IngestResult",
    "InputError",
    "ModelConfig",
    "ReadOnlyError",
    "RuntimeConfig",
    "SomaInput",
    "TrainingConfig",
    "TrainingError",
    "TransferConfig",
    "VersionInfo",
    "__version__",
    "example_atlas",
]
