"""Upgrading manifests of older atlas formats, step by step, with the scripts in ``migrations/layout``."""

from __future__ import annotations

from typing import Any

from atlasengine.errors import AtlasFormatError


def upgrade_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring a manifest dict of an older format to the current one."""
    from atlasengine.store.manifest import FORMAT_VERSION

    fmt = raw["format_version"]
    raise AtlasFormatError(f"no upgrade path from atlas format {fmt} to {FORMAT_VERSION}")
