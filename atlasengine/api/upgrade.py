"""Upgrading an atlas written by an older format, one step at a time.

Each step is a module in the top-level ``migrations/layout/`` folder (shipped in the wheel as
``atlasengine._migrations.layout``) named ``mNNNN_<what>.py`` with ``FROM_VERSION``,
``TO_VERSION`` and either or both of:

- ``upgrade_manifest(raw: dict) -> dict``: the manifest's JSON, changed to the new format;
- ``upgrade_files(reader: VersionReader, root: Path) -> Manifest | None``: files the new format
  needs, written from the atlas as it is (``reader`` reads its newest version, manifest already
  upgraded); it returns the manifest that records them, if it changed it.

and optionally ``REMOVE_AFTER_COMMIT``: files of the old format deleted once the upgraded
manifest is committed.

Manifest changes run first, in order, then file steps, in order; the upgraded manifest is
written last, so a crash mid-upgrade leaves the old format and the next open runs it again.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from types import ModuleType

from atlasengine.errors import AtlasFormatError, AtlasIntegrityError, AtlasWriteError
from atlasengine.store.atlas_store import SUPERSEDED, AtlasStore, listed_paths
from atlasengine.store.lock import WriteLock
from atlasengine.store.manifest import FORMAT_VERSION, Manifest, parse_manifest, read_raw_manifest
from atlasengine.store.version import VersionReader

log = logging.getLogger("atlasengine")
_STEP = re.compile(r"^m(\d{4})_[a-z0-9_]+\.py$")


def layout_migrations_dir() -> Path:
    """Return the folder of layout migration steps (the source tree's, or the installed copy)."""
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


def _version_files(root: Path) -> set[Path]:
    """Every file and folder under ``root/versions`` (links not followed)."""
    folder = root / "versions"
    return set(folder.rglob("*")) if folder.is_dir() else set()


def _remove_written(store: AtlasStore, before: Manifest, existed: set[Path]) -> None:
    """Delete what a failed upgrade wrote: what appeared under ``versions/`` since it began, and staging folders.

    A file the committed manifest lists is never deleted.
    """
    listed = {store.root / rel for rel in listed_paths(before)}
    for path in sorted(_version_files(store.root) - existed, key=lambda p: len(p.parts), reverse=True):
        if path in listed:
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)
    store.remove_uncommitted(before)
    (store.root / SUPERSEDED).unlink(missing_ok=True)


def upgrade_atlas(root: Path) -> int:
    """Bring the atlas at ``root`` to the current format; returns the format it had."""
    with WriteLock(root, task=f"an upgrade to format {FORMAT_VERSION}"):
        raw = read_raw_manifest(root)
        found = raw["format_version"]
        steps, available = [], _steps()
        while raw["format_version"] < FORMAT_VERSION:
            step = available.get(raw["format_version"])
            if step is None:
                raise AtlasFormatError(f"no upgrade from atlas format {raw['format_version']} (migrations/layout)")
            log.warning("upgrading atlas %s from format %d to %d", root, step.FROM_VERSION, step.TO_VERSION)
            if hasattr(step, "upgrade_manifest"):
                raw = step.upgrade_manifest(dict(raw))
            raw = {**raw, "format_version": step.TO_VERSION}
            steps.append(step)
        store = AtlasStore(root)
        manifest = before = parse_manifest(root, raw)
        existed = _version_files(root)
        superseded: set[str] = set()
        try:
            if manifest.versions:
                for step in steps:
                    if hasattr(step, "upgrade_files"):
                        upgraded = step.upgrade_files(VersionReader(store, manifest), root) or manifest
                        superseded |= listed_paths(manifest) - listed_paths(upgraded)
                        manifest = upgraded
            store.record_superseded(superseded - listed_paths(manifest))
            store.commit(manifest)
        except (AtlasFormatError, AtlasIntegrityError, AtlasWriteError, OSError) as exc:
            try:
                if read_raw_manifest(root)["format_version"] == found:  # not committed: undo what it wrote
                    _remove_written(store, before, existed)
            except (OSError, AtlasFormatError) as cleanup:  # the error to report is the upgrade's own
                log.warning("could not remove what the failed upgrade of %s wrote (%s); the next writer will", root,
                            cleanup)
            if isinstance(exc, OSError):
                advice = (" (an upgrade writes into every version's folder: run it as a user who may)"
                          if isinstance(exc, PermissionError) else "")
                raise AtlasWriteError(f"upgrading atlas {root} from format {found} to {FORMAT_VERSION} failed, and "
                                      f"it stays in format {found}: {exc}{advice}") from exc
            raise type(exc)(f"upgrading atlas {root} from format {found} to {FORMAT_VERSION} failed, and it "
                            f"stays in format {found}: {exc}") from exc
        for step in steps:
            for name in getattr(step, "REMOVE_AFTER_COMMIT", ()):
                (root / name).unlink(missing_ok=True)
        store.remove_superseded(manifest)
        return found

