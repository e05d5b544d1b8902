"""On-disk layout of an atlas and the commit protocol.

```
<root>/manifest.json       committed versions (replaced atomically: the commit point)
<root>/cells/              TileDB-SOMA experiment: counts + obs of every cell
<root>/versions/v0001/     model.safetensors (weights, fisher, anchor), config.json,
                           latent.npy (all atlas cells), index files, predictions
<root>/drift.duckdb        drift tables (rows of uncommitted versions are ignored and purged)
<root>/.staging/           a version being written; never read
```
A version directory is written under ``.staging``, renamed into ``versions/`` and only then
listed in the manifest. Anything in ``versions/`` or ``.staging`` that the manifest does not
list is the leftover of a failed attempt: ignored by readers, removed by the next writer.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from atlasengine.errors import AtlasIntegrityError
from atlasengine.store.cells import CellStore
from atlasengine.store.files import fsync_dir, sha256_file
from atlasengine.store.manifest import FileRecord, Manifest, VersionInfo, read_manifest, write_manifest

CELLS = "cells"
VERSIONS = "versions"
STAGING = ".staging"
DRIFT_DB = "drift.duckdb"


def version_dirname(number: int) -> str:
    """Return the directory name of version ``number`` (``vNNNN``)."""
    return f"v{number:04d}"


class AtlasStore:
    """Paths, integrity checks and commits of one atlas directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.cells = CellStore(str(self.root / CELLS))
        self._verified: set[tuple[int, str, str]] = set()

    @property
    def drift_path(self) -> Path:
        """Path of the atlas's drift database."""
        return self.root / DRIFT_DB

    def read_manifest(self) -> Manifest:
        """Read and validate the atlas's manifest (see :func:`~atlasengine.store.manifest.read_manifest`)."""
        return read_manifest(self.root)

    def commit(self, manifest: Manifest) -> None:
        """Atomically replace the atlas's manifest with ``manifest`` (the commit point)."""
        write_manifest(self.root, manifest)

    def version_dir(self, number: int) -> Path:
        """Return the directory of committed version ``number`` (``versions/vNNNN``)."""
        return self.root / VERSIONS / version_dirname(number)

    def stage(self) -> Path:
        """Create and return a fresh, uniquely named directory under ``.staging``."""
        path = self.root / STAGING / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def publish(self, staged: Path, number: int) -> dict[str, FileRecord]:
        """Checksum the staged files and move the directory to ``versions/vNNNN``."""
        final = self.version_dir(number)
        records = {}
        for f in sorted(staged.rglob("*")):
            if f.is_file():
                rel = f.relative_to(staged)
                records[str(rel)] = FileRecord(
                    path=f"{VERSIONS}/{version_dirname(number)}/{rel}", sha256=sha256_file(f), size=f.stat().st_size
                )
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
        fsync_dir(final.parent)
        self._verified.update((number, key, rec.sha256) for key, rec in records.items())  # just hashed
        return records

    def moved_to(self, root: Path) -> "AtlasStore":
        """Return this store after its directory was renamed to ``root`` (checks already done are kept)."""
        moved = AtlasStore(root)
        moved._verified = set(self._verified)
        return moved

    def file(self, version: VersionInfo, key: str, verify: bool = True) -> Path:
        """Path of a version's file, checked against the manifest's size and checksum."""
        rec = version.files.get(key)
        if rec is None:
            raise AtlasIntegrityError(f"version {version.number} records no file {key!r}")
        path = self.root / rec.path
        if not path.exists():
            raise AtlasIntegrityError(f"file {rec.path} of version {version.number} is missing")
        if verify and (version.number, key, rec.sha256) not in self._verified:
            size = path.stat().st_size
            if size != rec.size:
                raise AtlasIntegrityError(
                    f"file {rec.path} of version {version.number} has {size} bytes, expected {rec.size} (truncated or replaced)"
                )
            if sha256_file(path) != rec.sha256:
                raise AtlasIntegrityError(f"file {rec.path} of version {version.number} does not match its checksum (corrupted)")
            self._verified.add((version.number, key, rec.sha256))
        return path

    def verify(self, version: VersionInfo) -> None:
        """Check every file of ``version`` (presence, size, SHA-256); raise naming the first bad one."""
        for key in version.files:
            self.file(version, key)

    def remove_uncommitted(self, manifest: Manifest) -> list[str]:
        """Delete version directories and staging left by failed attempts; return what was removed."""
        removed = []
        staging = self.root / STAGING
        if staging.exists():
            shutil.rmtree(staging)
            removed.append(STAGING)
        known = {version_dirname(v.number) for v in manifest.versions}
        vdir = self.root / VERSIONS
        if vdir.exists():
            for d in vdir.iterdir():
                if d.name not in known:
                    shutil.rmtree(d)
                    removed.append(f"{VERSIONS}/{d.name}")
        return removed
