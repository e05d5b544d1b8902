"""On-disk layout of an atlas and the commit protocol.

```
<root>/manifest.json       committed versions (replaced atomically: the commit point)
<root>/cells/              TileDB-SOMA experiment: counts + obs of every cell, and in
                           cells/obs_columns/ each dataset's own obs columns (``metadata.py``)
<root>/versions/v0001/     model.safetensors (weights, fisher, anchor), config.json, latent.npy
                           (all atlas cells), index files, predictions, cell checksums,
                           drift/<table>.parquet (the drift rows of this version)
<root>/.staging/           versions being written; never read
<root>/.write.lock         the write lock (held by the kernel, see ``lock.py``)
<root>/.superseded.json    version files an upgrade replaced, deleted once the manifest that
                           lists their replacements is committed (present only after a crash)
```
A version directory is written under ``.staging/<id>`` (with a marker file saying the engine
made it), renamed into ``versions/`` and only then listed in the manifest. Before the switch
the writer checks that the manifest is still the one it started from, so a second writer can
never overwrite a commit, and the rename never replaces an existing directory. A marked
directory that the manifest does not list is the leftover of a failed attempt: ignored by
readers, removed by the next writer, its marker last (so a removal cut short is found again).
Anything without the marker is left alone, but an empty folder of the engine's names.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from atlasengine.errors import (
    AtlasConflictError,
    AtlasError,
    AtlasFormatError,
    AtlasIntegrityError,
    AtlasWriteError,
    InputError,
)
from atlasengine.store.cells import CellStore
from atlasengine.store.files import apply_umask, atomic_write_text, fsync_dir, sha256_file
from atlasengine.store.manifest import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    VersionInfo,
    read_manifest,
    write_manifest,
)

CELLS = "cells"
VERSIONS = "versions"
STAGING = ".staging"
SUPERSEDED = ".superseded.json"
"""The version files a committed upgrade no longer lists, recorded before its commit so a crash cannot keep them."""
STAGED_MARK = ".atlasengine-staged"
"""A file in every directory the engine stages: only such directories are ever removed."""
VERSION_NAME = re.compile(r"^v\d{4,}$")


def listed_paths(manifest: Manifest) -> set[str]:
    """Return the paths of every file ``manifest``'s versions list."""
    return {rec.path for v in manifest.versions for rec in v.files.values()}


def version_dirname(number: int) -> str:
    """Return the directory name of version ``number`` (``vNNNN``)."""
    return f"v{number:04d}"


URI_CHARACTERS = ("?", "#")
"""Characters TileDB reads as parts of a URI (query, fragment) even in a plain path."""


def local_path(path: str | Path) -> Path:
    """Return ``path`` absolute, with ``~`` expanded (``..`` and links are left for the system to follow).

    An open atlas keeps working after the process changes directory.

    >>> local_path("a/b.atlas") == Path.cwd() / "a" / "b.atlas"
    True
    """
    return Path(os.path.expanduser(os.fspath(path))).absolute()


def check_atlas_path(root: Path) -> None:
    """Refuse an atlas path the cell store cannot use (``?`` or ``#`` in it), with the reason."""
    found = [c for c in URI_CHARACTERS if c in str(root)]
    if found:
        raise InputError(
            f"the atlas path {root} contains {' and '.join(repr(c) for c in found)}: the cell store (TileDB) reads "
            "these as parts of a URI and would write elsewhere; choose a path without them"
        )


_STAGED_NAME = re.compile(r"^[0-9a-f]{32}$")
_HALF_WRITTEN = re.compile(r"^(\.manifest|\.\.superseded)\.json\.tmp-\d+$")
"""What :func:`~atlasengine.store.files.atomic_write_text` leaves of the manifest or the superseded record when killed."""


def _is_engine_dir(path: Path) -> bool:
    """Whether ``path`` is a real directory (not a link) that the engine's staging made.

    An empty directory counts too: one whose removal was cut short after its marker went, or
    one staged by a writer that died between making it and marking it (it holds nothing of anyone's).
    """
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / STAGED_MARK).is_file() or not any(path.iterdir())


def _remove_engine_dir(path: Path) -> None:
    """Delete a directory the engine staged, its marker last, so a removal cut short is found again."""
    for child in path.iterdir():
        if child.name == STAGED_MARK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / STAGED_MARK).unlink(missing_ok=True)
    path.rmdir()


def _relative_files(folder: Path) -> list[Path]:
    return [f.relative_to(folder) for f in sorted(folder.rglob("*")) if f.is_file() and f.name != STAGED_MARK]


class AtlasStore:
    """Paths, integrity checks and commits of one atlas directory.

    ``cells``: the cell store when it is not ``root/cells`` (an atlas read from object storage:
    its version files fetched into ``root``, its cells read in place); ``source``: where the
    atlas lives, as the user named it (default ``root``).
    """

    def __init__(self, root: Path, cells: CellStore | None = None, source: str | None = None) -> None:
        self.root = local_path(root)
        check_atlas_path(self.root)
        self.cells = cells if cells is not None else CellStore(str(self.root / CELLS))
        self.source = source if source is not None else str(self.root)
        self._verified: set[tuple[int, str, str]] = set()

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> Manifest:
        """Read and validate the atlas's manifest (see :func:`~atlasengine.store.manifest.read_manifest`)."""
        return read_manifest(self.root)

    def manifest_digest(self) -> str:
        """SHA-256 of the manifest file as it is now: a writer's record of what it started from."""
        try:
            return sha256_file(self.root / MANIFEST_NAME)
        except OSError as exc:
            raise AtlasFormatError(f"cannot read {self.root / MANIFEST_NAME}: {exc.strerror}") from exc

    def check_unchanged(self, digest: str) -> None:
        """Raise :class:`AtlasConflictError` if the manifest is no longer the one with ``digest``."""
        if self.manifest_digest() == digest:
            return
        try:
            newest = f"it now lists versions up to {self.read_manifest().current}"
        except AtlasError:  # the conflict is the news; a second problem would hide it
            newest = "it changed"
        raise AtlasConflictError(
            f"another writer committed to {self.root} while this one worked ({newest}); nothing of this write "
            "was committed and nothing was removed: open the atlas again and repeat it"
        )

    def commit(self, manifest: Manifest, expected: str | None = None) -> None:
        """Atomically replace the manifest with ``manifest`` (the commit point).

        ``expected``: the digest of the manifest the writer started from; the commit is
        refused if another writer committed since.
        """
        if expected is not None:
            self.check_unchanged(expected)
        try:
            write_manifest(self.root, manifest)
        except OSError as exc:
            raise AtlasWriteError(
                f"cannot write {self.root / MANIFEST_NAME}: {exc.strerror}; nothing was committed"
            ) from exc

    # ------------------------------------------------------------------ versions
    def version_dir(self, number: int) -> Path:
        """Return the directory of committed version ``number`` (``versions/vNNNN``)."""
        return self.root / VERSIONS / version_dirname(number)

    def check_writable_layout(self, number: int) -> None:
        """Refuse, before anything is written, what would stop version ``number`` from being staged or published.

        ``.staging`` must be a folder of the engine's (not a file or a link), and
        ``versions/vNNNN`` must not exist already (:meth:`remove_uncommitted` has removed the
        engine's own leftovers; anything else there is not the engine's to replace).
        """
        staging = self.root / STAGING
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
            raise AtlasFormatError(
                f"{staging} is not a folder: atlasengine stages new versions there; move it away and try again"
            )
        final = self.version_dir(number)
        if final.exists() or final.is_symlink():
            raise AtlasConflictError(
                f"{final} already exists but is not a committed version nor a leftover of this engine: it is left "
                f"alone; move it away to add version {number}"
            )

    def stage(self) -> Path:
        """Create and return a fresh, uniquely named, marked directory under ``.staging``."""
        staging = self.root / STAGING
        path = staging / uuid.uuid4().hex  # a name _STAGED_NAME matches
        try:
            path.mkdir(parents=True)
            (path / STAGED_MARK).write_text("staged by atlasengine; removed by the next writer unless committed\n")
        except OSError as exc:
            raise AtlasWriteError(f"cannot create {path}: {exc.strerror}; nothing was committed") from exc
        return path

    def _records(self, staged: Path, number: int) -> dict[str, FileRecord]:
        apply_umask(staged)
        records = {}
        for rel in _relative_files(staged):
            f = staged / rel
            records[rel.as_posix()] = FileRecord(  # on disk before the manifest that lists it
                path=f"{VERSIONS}/{version_dirname(number)}/{rel.as_posix()}", sha256=sha256_file(f, sync=True),
                size=f.stat().st_size,
            )
        for folder in [*(d for d in staged.rglob("*") if d.is_dir()), staged]:
            fsync_dir(folder)
        return records

    def publish(self, staged: Path, number: int, expected: str | None = None) -> dict[str, FileRecord]:
        """Checksum the staged files and move the directory to ``versions/vNNNN``; return their records.

        Never replaces an existing directory: if ``versions/vNNNN`` appeared (another writer, or
        a folder put there by hand), or the manifest changed since ``expected``, it raises
        :class:`AtlasConflictError` and leaves everything where it is.
        """
        if expected is not None:
            self.check_unchanged(expected)
        records = self._records(staged, number)
        final = self.version_dir(number)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)  # fails on a non-empty directory: nothing committed is replaced
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise AtlasConflictError(
                    f"{final} already exists and this writer did not make it (another writer at work, or a folder "
                    "put there by hand): it was left alone and nothing was committed"
                ) from exc
            raise AtlasWriteError(f"cannot move {staged} to {final}: {exc.strerror}") from exc
        fsync_dir(final.parent)
        self._verified.update((number, key, rec.sha256) for key, rec in records.items())  # just hashed
        return records

    def replace_files(self, staged: Path, version: VersionInfo) -> VersionInfo:
        """Move the staged files into committed ``version``'s directory, replacing those of the same name.

        Used only to rebuild files that failed their checksum. Returns ``version`` with the new
        files' records, for the manifest of the next commit (until then the files fail their old
        checksum, as before).
        """
        return self._install(staged, version, None)

    def add_files(self, staged: Path, version: VersionInfo, tag: str) -> VersionInfo:
        """Move the staged files into committed ``version``'s directory beside those they replace.

        Each file ``<folder>/<name>`` goes in as ``<folder>/<tag>/<name>``, so every file the
        committed manifest lists stays as it is until a manifest that lists the new ones is
        committed (an atlas upgrade, :mod:`atlasengine.api.upgrade`, then deletes the old ones).
        Returns ``version`` with the new files recorded under the old files' keys.
        """
        return self._install(staged, version, tag)

    def _install(self, staged: Path, version: VersionInfo, tag: str | None) -> VersionInfo:
        """Move the staged files into ``version``'s directory (under ``tag`` beside the old ones); return its record."""
        records = self._records(staged, version.number)
        final = self.version_dir(version.number)
        for key, rec in list(records.items()):
            rel = key if tag is None else (Path(key).parent / tag / Path(key).name).as_posix()
            target = final / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / key, target)
            fsync_dir(target.parent)
            records[key] = rec.model_copy(update={"path": f"{VERSIONS}/{version_dirname(version.number)}/{rel}"})
        fsync_dir(final)
        shutil.rmtree(staged, ignore_errors=True)
        self._verified.update((version.number, key, rec.sha256) for key, rec in records.items())
        return version.model_copy(update={"files": {**version.files, **records}})

    def moved_to(self, root: Path) -> "AtlasStore":
        """Return this store after its directory was renamed to ``root`` (checks already done are kept)."""
        moved = AtlasStore(root)
        moved._verified = set(self._verified)
        return moved

    # ------------------------------------------------------------------ reading
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
            try:
                digest = sha256_file(path)
            except OSError as exc:
                raise AtlasIntegrityError(f"file {rec.path} of version {version.number} cannot be read: {exc.strerror}") from exc
            if digest != rec.sha256:
                raise AtlasIntegrityError(f"file {rec.path} of version {version.number} does not match its checksum (corrupted)")
            self._verified.add((version.number, key, rec.sha256))
        return path

    def verify(self, version: VersionInfo, skip: tuple[str, ...] = ()) -> None:
        """Check every file of ``version`` (presence, size, SHA-256) but those under ``skip``; raise naming the first bad one."""
        for key in version.files:
            if not key.startswith(skip):
                self.file(version, key)

    # ------------------------------------------------------------------ housekeeping
    def leftovers(self, manifest: Manifest) -> list[Path]:
        """Directories the engine staged that ``manifest`` does not list (failed attempts).

        Only marked directories count, and empty ones of the names the engine gives (``vNNNN``,
        a staging id): a user's folder (``v0002_backup``), a stray file (``.DS_Store``) or
        anything behind a link is never one.
        """
        found = []
        staging = self.root / STAGING
        if staging.is_dir() and not staging.is_symlink():
            found += [d for d in sorted(staging.iterdir()) if _STAGED_NAME.match(d.name) and _is_engine_dir(d)]
        known = {version_dirname(v.number) for v in manifest.versions}
        vdir = self.root / VERSIONS
        if vdir.is_dir():
            found += [d for d in sorted(vdir.iterdir())
                      if VERSION_NAME.match(d.name) and d.name not in known and _is_engine_dir(d)]
        return found

    def remove_uncommitted(self, manifest: Manifest) -> list[str]:
        """Delete what failed attempts staged (see :meth:`leftovers`) and half-written manifests; return what went.

        Called under the write lock only.
        """
        removed = []
        for path in self.leftovers(manifest):
            _remove_engine_dir(path)
            removed.append(path.relative_to(self.root).as_posix())
        for path in sorted(self.root.glob(".*.json.tmp-*")):  # a commit killed before its rename (under the lock:
            if _HALF_WRITTEN.match(path.name) and path.is_file() and not path.is_symlink():  # no writer is at work)
                path.unlink()
                removed.append(path.name)
        return removed

    def record_superseded(self, paths: set[str]) -> None:
        """Record version files (paths as the manifest lists them) that the next commit stops listing.

        Written before that commit: a crash between the commit and :meth:`remove_superseded`
        leaves the record, and the next writer deletes the files.
        """
        if paths:
            atomic_write_text(self.root / SUPERSEDED, json.dumps(sorted(paths)))

    def remove_superseded(self, manifest: Manifest) -> list[str]:
        """Delete the recorded superseded files that committed ``manifest`` does not list; return them.

        If the commit never happened, the manifest still lists them and they stay: only the
        record goes. Only files inside ``versions/`` are ever deleted.
        """
        record = self.root / SUPERSEDED
        try:
            paths = json.loads(record.read_text())
        except FileNotFoundError:
            return []
        except ValueError:  # a damaged record names nothing that can be trusted: dropped below
            paths = []
        except OSError:  # unreadable now (permissions, I/O): kept, so the files are removed another time
            return []
        listed = listed_paths(manifest)
        versions, removed = (self.root / VERSIONS).resolve(), []
        for path in sorted(p for p in paths if isinstance(p, str) and p not in listed) if isinstance(paths, list) else []:
            target = (self.root / path).resolve()
            if target.is_relative_to(versions) and target.is_file():
                target.unlink()
                removed.append(path)
        record.unlink(missing_ok=True)
        return removed
