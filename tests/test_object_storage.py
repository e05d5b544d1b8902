"""An atlas published on object storage: opened read-only from an S3 server, it maps cells exactly as its local copy.

The S3 server is moto's, started by the test on 127.0.0.1; the engine reaches it through TileDB
(the cells) and fsspec / s3fs (the version files), as it would reach AWS or MinIO.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from atlasengine import Atlas, AtlasFormatError, AtlasIntegrityError
from atlasengine.errors import InputError, ReadOnlyError

BUCKET = "atlases"


@pytest.fixture(scope="module")
def s3():
    """(storage_options, s3fs filesystem) of an S3 server on 127.0.0.1 holding one empty bucket."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
               "client_kwargs": {"region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield options, s3fs.S3FileSystem(**options)
    server.stop()


def _publish(fs, local, name: str) -> str:
    fs.put(str(local), f"{BUCKET}/{name}", recursive=True)
    return f"s3://{BUCKET}/{name}"


def test_an_atlas_on_s3_maps_cells_exactly_as_its_local_copy(s3, two_version_atlas, pancreas_query):
    options, fs = s3
    uri = _publish(fs, two_version_atlas, "pancreas.atlas")
    local = Atlas.open(two_version_atlas)
    remote = Atlas.open(uri, storage_options=options)
    assert remote.source == uri and remote.read_only and uri in repr(remote)
    assert remote.version == local.version and remote.genes == local.genes
    q = pancreas_query[:80].copy()
    pd.testing.assert_frame_equal(remote.transfer_labels(q, batch_key="tech"), local.transfer_labels(q, batch_key="tech"))
    pd.testing.assert_frame_equal(remote.obs(), local.obs())
    np.testing.assert_array_equal(remote.latent(), local.latent())
    assert (remote.counts() != local.counts()).nnz == 0  # counts read from SOMA over S3, checked against checksums
    pd.testing.assert_frame_equal(remote.drift(), local.drift())
    first = Atlas.open(uri, version=1, storage_options=options)
    np.testing.assert_array_equal(first.latent(), Atlas.open(two_version_atlas, version=1).latent())
    with pytest.raises(ReadOnlyError, match="object storage are read-only"):
        remote.ingest(q, batch_key="tech")


def test_a_damaged_or_missing_atlas_on_s3_is_refused_by_name(s3, two_version_atlas):
    options, fs = s3
    uri = _publish(fs, two_version_atlas, "damaged.atlas")
    latent = next(p for p in fs.find(f"{BUCKET}/damaged.atlas/versions/v0002") if p.endswith("latent.npy"))
    fs.pipe_file(latent, b"not the embeddings")
    with pytest.raises(AtlasIntegrityError, match="latent.npy"):
        Atlas.open(uri, storage_options=options)
    with pytest.raises(AtlasFormatError, match="is not an atlas"):
        Atlas.open(f"s3://{BUCKET}/nothing-here", storage_options=options)
    with pytest.raises(InputError, match="storage_options are for atlases at a URL"):
        Atlas.open(two_version_atlas, storage_options=options)


def test_a_published_manifest_cannot_make_the_reader_write_outside_its_folder(s3, two_version_atlas, tmp_path,
                                                                              monkeypatch):
    import json
    import tempfile

    options, fs = s3
    uri = _publish(fs, two_version_atlas, "hostile.atlas")
    manifest = json.loads(fs.cat_file(f"{BUCKET}/hostile.atlas/manifest.json"))
    record = next(iter(manifest["versions"][0]["files"].values()))
    record["path"] = "../../escaped.txt"
    fs.pipe_file(f"{BUCKET}/hostile.atlas/manifest.json", json.dumps(manifest).encode())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the reader fetches to
    with pytest.raises(AtlasFormatError, match="outside the atlas's versions/ folder"):
        Atlas.open(uri, storage_options=options)
    assert list(tmp_path.rglob("*")) == []  # nothing written, the fetch folder removed


def test_an_atlas_on_s3_opens_with_the_endpoint_and_keys_only_in_the_environment(s3, two_version_atlas, monkeypatch):
    options, fs = s3
    uri = _publish(fs, two_version_atlas, "env.atlas")
    for name, value in (("AWS_ENDPOINT_URL", options["endpoint_url"]), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    atlas = Atlas.open(uri)  # no storage_options: what the AWS command-line tools would use
    np.testing.assert_array_equal(atlas.latent(), Atlas.open(two_version_atlas).latent())
    assert len(atlas.obs()) == len(Atlas.open(two_version_atlas).obs())
