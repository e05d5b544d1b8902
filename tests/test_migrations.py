"""An atlas written by the previous format (fixture made by the old code itself) opens and upgrades."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from atlasengine import Atlas
from atlasengine.store.manifest import FORMAT_VERSION

FIXTURE = Path(__file__).parent / "fixtures" / "format1.atlas"


def test_format1_atlas_opens_upgrades_and_keeps_its_versions(tmp_path, pancreas):
    path = tmp_path / "old.atlas"
    shutil.copytree(FIXTURE, path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 1
    assert not (path / "drift.duckdb").exists()
    z1_file = np.load(path / "versions" / "v0001" / "latent.npy")

    atlas = Atlas.open(path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    assert atlas.version == 2 and [v.number for v in atlas.versions] == [1, 2]
    np.testing.assert_array_equal(Atlas.open(path, version=1).latent(), z1_file)
    # the drift history was computed for every old version
    d = atlas.drift()
    assert sorted(set(d["version"])) == [1, 2]
    assert set(atlas.sql("select strategy from versions")["strategy"]) == {"reference", "ewc"}
    # and the upgraded atlas keeps working
    q = pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy()
    res = atlas.ingest(q, batch_key="tech", strategy="surgery", training={"max_epochs": 1})
    assert res.version.number == 3
    assert sorted(set(atlas.drift()["version"])) == [1, 2, 3]
