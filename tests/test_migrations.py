"""An atlas written by the previous format (fixture made by the old code itself) opens and upgrades."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

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


def test_format2_atlas_drops_machine_settings_and_keeps_everything_else(tmp_path, pancreas):
    path = tmp_path / "old2.atlas"
    shutil.copytree(FIXTURE.with_name("format2.atlas"), path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == 2 and "progress_bar" in raw["config"]["query_training"]
    z2_file = np.load(path / "versions" / "v0002" / "latent.npy")
    drift_before = None

    atlas = Atlas.open(path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    for section in ("reference_training", "query_training"):
        assert not {"accelerator", "devices", "progress_bar"} & set(raw["config"][section])
    assert atlas.version == 2 and atlas.versions[-1].strategy == "ewc"
    np.testing.assert_array_equal(atlas.latent(), z2_file)
    drift_before = atlas.drift()
    assert sorted(set(drift_before["version"])) == [1, 2]  # the stored drift history is kept as it was
    assert atlas.predictions() is not None and len(atlas.predictions()) == 20
    q = pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy()
    res = atlas.ingest(q, batch_key="tech", strategy="ewc", training={"max_epochs": 1})
    assert res.version.number == 3
    assert Atlas.open(path, version=2).drift().equals(drift_before)


def test_format3_atlas_reads_its_fisher_as_a_mean_with_its_cells_and_keeps_its_penalty(tmp_path, pancreas):
    from safetensors.torch import load_file

    path = tmp_path / "old3.atlas"
    shutil.copytree(FIXTURE.with_name("format3.atlas"), path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == 3 and "penalty_scale" not in raw["config"]["continual"]
    stored = load_file(path / "versions" / "v0002" / "model.safetensors")

    atlas = Atlas.open(path)
    assert atlas.config.continual.penalty_scale == "fixed"  # the stored ewc_lambda pulls as hard as before
    assert atlas.info.fisher["represented_cells"] == 60 and atlas.info.fisher["n_means"] == 2
    for name, mean in atlas.fisher().items():  # version 2 had summed two per-cell means
        torch.testing.assert_close(mean, stored[f"fisher/{name}"] / 2)
    q = pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy()
    res = atlas.ingest(q, batch_key="tech", strategy="ewc", training={"max_epochs": 1})
    assert res.version.fisher["kind"] == "per_cell_mean" and res.version.fisher["represented_cells"] == 75
