"""atlasengine: a versioned single-cell reference atlas that folds in new datasets with online EWC."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from atlasengine.version import __version__

if TYPE_CHECKING:
    from atlasengine.api import Atlas, IngestResult, SomaInput, example_atlas
    from atlasengine.store.manifest import VersionInfo

_LAZY = {"Atlas": "atlasengine.api", "IngestResult": "atlasengine.api", "SomaInput": "atlasengine.api",
         "example_atlas": "atlasengine.api", "VersionInfo": "atlasengine.store.manifest"}
"""Names imported on first use: the API brings torch, Lightning and TileDB-SOMA (seconds), which
``atlasengine --help``, an error message or a configuration does not need."""


def __getattr__(name: str) -> Any:
    """Import the API's names on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'atlasengine' has no attribute {name!r}")


def __dir__() -> list[str]:
    """List the public names, the lazily imported ones included."""
    return sorted(set(globals()) | set(__all__))

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
