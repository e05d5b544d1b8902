"""The user-facing API.

The ``Atlas`` composes store, model, training, continual learning, label transfer and drift
tracking.
"""

from atlasengine.api.atlas import Atlas, IngestResult

__all__ = ["Atlas", "IngestResult"]
