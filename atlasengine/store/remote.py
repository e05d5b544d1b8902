"""Reading an atlas published on object storage (S3 or anything fsspec reaches), read-only.

The cells stay where they are: the SOMA experiment is read in place through TileDB's own virtual
file system (``s3://``), in the bounded parts every read already uses. The manifest and the
version files (checkpoint, embeddings, neighbour index, calibration, predictions, drift parts)
are fetched through fsspec into a local folder, then checked against the manifest's checksums as
any atlas's files are, so a damaged or half-uploaded file is refused the same way. Writing
stays on a file system: publish an atlas by copying its folder (``aws s3 sync``, ``fs.put``).

TileDB does not read fsspec's settings, so the S3 settings of ``storage_options`` are given to
both: ``key`` / ``secret`` / ``token`` (or the environment's AWS credentials, which both libraries
read themselves), ``anon``, ``profile``, ``endpoint_url`` (top level or in ``client_kwargs``, else the environment's
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, which fsspec's botocore reads) for an S3-compatible server,
``client_kwargs["region_name"]``; ``tiledb_config`` adds TileDB settings as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from atlasengine.errors import AtlasFormatError, InputError
from atlasengine.store.manifest import MANIFEST_NAME, AtlasNeedsUpgrade, read_manifest

CELLS = "cells"
VERSIONS = "versions"


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL of object storage (``s3://bucket/atlas``): a scheme, then ``://``, not ``file``.

    >>> is_remote("s3://bucket/a.atlas"), is_remote("run:1.atlas"), is_remote("file:///tmp/a.atlas")
    (True, False, False)
    """
    if isinstance(path, Path) or "://" not in str(path):
        return False
    scheme = urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def tiledb_settings(uri: str, storage_options: dict[str, Any]) -> dict[str, str]:
    """TileDB settings equivalent to fsspec's ``storage_options`` for ``uri`` (S3 only; others: ``tiledb_config``)."""
    opts = dict(storage_options)
    config = {str(k): str(v) for k, v in (opts.pop("tiledb_config", None) or {}).items()}
    if urlparse(uri).scheme not in ("s3", "s3a"):
        return config
    client = opts.get("client_kwargs") or {}
    endpoint = (opts.get("endpoint_url") or client.get("endpoint_url")  # else the AWS tools' environment variables
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    found = {}
    if opts.get("key"):
        found["vfs.s3.aws_access_key_id"] = str(opts["key"])
    if opts.get("secret"):
        found["vfs.s3.aws_secret_access_key"] = str(opts["secret"])
    if opts.get("token"):
        found["vfs.s3.aws_session_token"] = str(opts["token"])
    if opts.get("anon"):
        found["vfs.s3.no_sign_request"] = "true"
    if opts.get("profile"):
        found["vfs.s3.aws_profile"] = str(opts["profile"])
    if client.get("region_name"):
        found["vfs.s3.region"] = str(client["region_name"])
    if endpoint:
        url = urlparse(str(endpoint))
        found.update({"vfs.s3.endpoint_override": url.netloc or url.path, "vfs.s3.scheme": url.scheme or "https",
                      "vfs.s3.use_virtual_addressing": "false"})
    return {**found, **config}


def _filesystem(uri: str, storage_options: dict[str, Any]):
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with the engine's dependencies
        raise InputError("reading an atlas from object storage needs fsspec (pip install 'atlasengine[s3]')") from exc
    opts = {k: v for k, v in storage_options.items() if k != "tiledb_config"}
    try:
        fs, root = fsspec.core.url_to_fs(uri, **opts)
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot reach {uri}: {exc} (for s3:// install atlasengine[s3])") from exc
    return fs, root.rstrip("/")


def fetch(uri: str, storage_options: dict[str, Any] | None = None,
          version: int | None = None) -> tuple[Path, str, dict[str, str]]:
    """Fetch the manifest and the version files an atlas's ``version`` reads into a new temporary folder.

    Returns (the local folder, named like the atlas; the URI of its cells; TileDB settings). The
    files of versions after ``version`` are not fetched. Raises :class:`AtlasFormatError` when
    ``uri`` holds no atlas manifest.
    """
    options = dict(storage_options or {})
    fs, root = _filesystem(uri, options)
    try:
        text = fs.cat_file(f"{root}/{MANIFEST_NAME}")
    except FileNotFoundError as exc:
        raise AtlasFormatError(f"{uri} is not an atlas: it has no {MANIFEST_NAME}") from exc
    except OSError as exc:
        raise AtlasFormatError(f"cannot read {uri}/{MANIFEST_NAME}: {exc}") from exc
    name = Path(urlparse(uri).path.rstrip("/")).name or "atlas"
    local = Path(tempfile.mkdtemp(prefix="atlasengine-remote-")) / name  # a folder of its own: removed on failure
    local.mkdir()
    try:
        return _fetch_into(local, fs, root, uri, text, options, version)
    except BaseException:
        shutil.rmtree(local.parent, ignore_errors=True)
        raise


def _fetch_into(local: Path, fs, root: str, uri: str, text: bytes, options: dict[str, Any],
                version: int | None) -> tuple[Path, str, dict[str, str]]:
    (local / MANIFEST_NAME).write_bytes(text)
    try:
        manifest = read_manifest(local)  # refuses newer formats and damaged manifests before anything is fetched
    except AtlasNeedsUpgrade as exc:
        raise AtlasFormatError(f"{uri} is an atlas of format {exc.found}, which must be upgraded before it is read: "
                               "open a copy on a file system with this atlasengine (that upgrades it) and publish "
                               "that") from exc
    except AtlasFormatError as exc:
        raise AtlasFormatError(f"{uri}: {exc}") from exc
    numbers = [v.number for v in manifest.versions if version is None or v.number <= int(version)]
    inside = local.resolve()
    for info in manifest.versions:
        if info.number not in numbers:
            continue
        for record in info.files.values():
            target = (local / record.path).resolve()
            parts = Path(record.path).parts
            if Path(record.path).is_absolute() or ".." in parts or not parts or parts[0] != VERSIONS \
                    or not target.is_relative_to(inside):
                raise AtlasFormatError(f"{uri}: the manifest names a file outside the atlas's versions/ folder "
                                       f"({record.path!r}); refusing to fetch it")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{root}/{record.path}", str(target))
            except FileNotFoundError:
                continue  # the file check names it as missing
    return local, f"{uri.rstrip('/')}/{CELLS}", tiledb_settings(uri, options)
