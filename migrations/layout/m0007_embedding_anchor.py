"""Atlas format 7 -> 8: the continual settings gain ``embedding_anchor``.

Format 8 can hold the replayed reference cells' embeddings during an ewc fold-in
(``ContinualConfig.embedding_anchor``, off by default). A format-7 atlas never did: this step
records ``embedding_anchor: 0`` in the manifest's continual settings, so it folds queries in
exactly as before, and an engine of format 7 refuses a format-8 atlas by its format number
instead of failing on a setting it does not know. Version files are unchanged.
"""

from __future__ import annotations

FROM_VERSION = 7
TO_VERSION = 8


def upgrade_manifest(raw: dict) -> dict:
    """Record that the atlas's fold-ins held no embeddings (``embedding_anchor: 0``)."""
    config = dict(raw.get("config") or {})
    continual = dict(config.get("continual") or {})
    continual.setdefault("embedding_anchor", 0.0)
    return {**raw, "config": {**config, "continual": continual}}
