"""Upgrading an atlas written by an older format, one step at a time.

Each step is a module in the top-level ``migrations/layout/`` folder (shipped in the wheel as
``atlasengine._migrations.layout``) named ``mNNNN_<what>.py`` with ``FROM_VERSION``,
``TO_VERSION`` and ``upgrade(atlas, root) -> None``. Steps write their new files first; the
manifest with the new ``format_version`` is written last, so a crash mid-upgrade leaves the
old format, and the next open runs the step again.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from types import ModuleType

from atlasengine.errors import AtlasFormatError
from atlasengine.store.atlas_store import AtlasStore
from atlasengine.store.lock import WriteLock
from atlasengine.store.manifest import FORMAT_VERSION, parse_manifest, read_raw_manifest

log = logging.getLogger("atlasengine")
_STEP = re.compile(r"^m(\d{4})_[a-z0-9_]+\.py$")


def layout_migrations_dir() -> Path:
    here = Path(__file__).resolve()
    for folder in (here.parents[2] / "migrations" / "layout", here.parents[1] / "_migrations" / "layout"):
        if folder.is_dir():
            return folder
    raise AtlasFormatError("atlas layout migrations not found (migrations/layout)")


def _steps() -> dict[int, ModuleType]:
    steps = {}
    for path in sorted(layout_migrations_dir().glob("m*.py")):
        if not _STEP.match(path.name):
            continue
        spec = importlib.util.spec_from_file_location(f"atlasengine_layout_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        steps[int(module.FROM_VERSION)] = module
    return steps


def upgrade_atlas(root: Path) -> int:
    """Bring the atlas at ``root`` to the current format; returns the format it had."""
    from atlasengine.api.atlas import Atlas

    with WriteLock(root):
        raw = read_raw_manifest(root)
        found = raw["format_version"]
        steps = _steps()
        while raw["format_version"] < FORMAT_VERSION:
            step = steps.get(raw["format_version"])
            if step is None:
                raise AtlasFormatError(f"no upgrade from atlas format {raw['format_version']} (migrations/layout)")
            log.warning("upgrading atlas %s from format %d to %d", root, step.FROM_VERSION, step.TO_VERSION)
            store = AtlasStore(root)
            manifest = parse_manifest(root, raw)
            step.upgrade(Atlas(store, manifest, manifest.current, read_only=True), root)
            raw = {**raw, "format_version": step.TO_VERSION}
            store.commit(parse_manifest(root, raw))
        return found
