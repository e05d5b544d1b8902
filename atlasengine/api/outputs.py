"""Files the engine writes where a user asks (predictions, exports, reports): checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

from atlasengine.errors import InputError
from atlasengine.store.atlas_store import VERSIONS, local_path
from atlasengine.store.manifest import MANIFEST_NAME


def check_output_path(path: str | Path, what: str, make_parents: bool = False) -> Path:
    """Refuse, before any work, a file path that cannot take ``what``; return it absolute.

    Refused: a path inside an atlas (a folder above it holds an atlas manifest and versions:
    writing there could replace the atlas's own files), an existing folder, and a folder that
    does not exist (created with ``make_parents``) or cannot be written.

    >>> check_output_path("/tmp/predictions.csv", "the predictions")
    PosixPath('/tmp/predictions.csv')
    """
    out = local_path(path)
    real = out.resolve()
    for folder in real.parents:
        if _is_atlas(folder):
            raise InputError(f"cannot write {what} to {out}: it is inside the atlas {folder}, whose own files it could "
                             "replace; write it outside the atlas folder")
    if out.is_dir():
        raise InputError(f"cannot write {what} to {out}: it is a folder")
    if make_parents:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot write {what} to {out}: {exc.strerror or exc}") from exc
    if not out.parent.is_dir():
        raise InputError(f"cannot write {what} to {out}: the folder {out.parent} does not exist")
    if not (os.access(out, os.W_OK) if out.is_file() else os.access(out.parent, os.W_OK | os.X_OK)):
        raise InputError(f"cannot write {what} to {out}: "
                         + ("the file is not writable" if out.is_file() else f"the folder {out.parent} is not writable"))
    return out


def _is_atlas(folder: Path) -> bool:
    """Whether ``folder`` holds an atlas: versions and a manifest that names its format."""
    manifest = folder / MANIFEST_NAME
    if not (manifest.is_file() and (folder / VERSIONS).is_dir()):
        return False
    try:
        with open(manifest, encoding="utf-8", errors="replace") as f:
            return '"format_version"' in f.read(1 << 16)
    except OSError:
        return False
