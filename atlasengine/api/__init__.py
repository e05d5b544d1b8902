"""The user-facing API.

The ``Atlas`` composes store, model, training, continual learning, label transfer and drift
tracking.
"""

from atlasengine.api.atlas import Atlas, IngestResult
from atlasengine.api.example import example_atlas
from atlasengine.api.sources import SomaInput

__all__ = ["Atlas", "IngestResult", "SomaInput", "example_atlas"]
