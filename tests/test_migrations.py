"""An atlas written by the previous format (fixture made by the old code itself) opens and upgrades."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from atlasengine import Atlas
from atlasengine.drift import VERSIONED_TABLES
from atlasengine.errors import AtlasWriteError
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


def _old_drift(path, table: str) -> pd.DataFrame:
    with duckdb.connect(str(path / "drift.duckdb"), read_only=True) as con:
        return con.execute(f"SELECT * FROM {table} ORDER BY ALL").df()


def test_format4_atlas_keeps_its_drift_rows_as_parts_of_each_version(tmp_path, pancreas):
    path = tmp_path / "old4.atlas"
    shutil.copytree(FIXTURE.with_name("format4.atlas"), path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 4
    old = {t: _old_drift(path, t) for t in ("versions", "version_drift", "celltype_drift", "cell_drift")}
    (path / "versions" / "v0003").mkdir()  # what a failed format-4 ingest left: removed as format 4 would
    (path / "versions" / "v0002_backup").mkdir()  # a user's folder: kept
    (path / ".staging" / ("ab" * 16)).mkdir(parents=True)

    atlas = Atlas.open(path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    assert not (path / "drift.duckdb").exists()
    assert sorted(p.name for p in (path / "versions").iterdir()) == ["v0001", "v0002", "v0002_backup"]
    assert not any((path / ".staging").iterdir())
    for info in atlas.versions:  # every part is a checksummed file of its version
        assert {f"drift/{t}.parquet" for t in VERSIONED_TABLES} <= set(info.files)
    pd.testing.assert_frame_equal(atlas.drift(), old["version_drift"])  # copied as they were, not recomputed
    pd.testing.assert_frame_equal(atlas.drift(by="cell_type"), old["celltype_drift"])
    pd.testing.assert_frame_equal(atlas.drift(by="cell"), old["cell_drift"])
    pd.testing.assert_frame_equal(atlas.sql("select * from versions order by version"), old["versions"])
    q = pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy()
    assert atlas.ingest(q, batch_key="tech", strategy="surgery", training={"max_epochs": 1}).version.number == 3
    assert sorted(set(atlas.drift()["version"])) == [1, 2, 3]


def test_format4_atlas_without_its_drift_database_gets_the_history_recomputed_not_emptied(tmp_path):
    path = tmp_path / "old4.atlas"
    shutil.copytree(FIXTURE.with_name("format4.atlas"), path)
    old = _old_drift(path, "version_drift")
    (path / "drift.duckdb").write_bytes(b"")  # an emptied (or deleted) database
    drift = Atlas.open(path).drift()
    assert drift[["version", "scope"]].equals(old[["version", "scope"]])
    numbers = [c for c in old.columns if c not in ("version", "scope")]
    np.testing.assert_allclose(drift[numbers].to_numpy(float), old[numbers].to_numpy(float), rtol=1e-4, atol=1e-6)


def test_format5_atlas_reads_as_before_and_takes_datasets_with_their_own_obs_columns(tmp_path, pancreas):
    path = tmp_path / "old5.atlas"
    shutil.copytree(FIXTURE.with_name("format5.atlas"), path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == 5 and all("obs_columns" not in d for d in raw["datasets"])
    z_file = np.load(path / "versions" / "v0002" / "latent.npy")
    predictions_file = pd.read_parquet(path / "versions" / "v0002" / "predictions.parquet")
    old_checksums = np.load(path / "versions" / "v0001" / "cell_checksums.npy")
    assert old_checksums.shape == (40, 2)
    before = {p: p.read_bytes() for p in (path / "versions").rglob("*") if p.is_file()}

    # an upgrade that dies before its commit leaves every file of format 5 as it was
    from atlasengine.store.atlas_store import AtlasStore

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AtlasStore, "commit", lambda self, manifest: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(AtlasWriteError, match="stays in format 5: disk gone"):
            Atlas.open(path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 5
    assert all(p.read_bytes() == data for p, data in before.items())

    atlas = Atlas.open(path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION and all(d["obs_columns"] == {} for d in raw["datasets"])
    assert not (path / "versions" / "v0001" / "cell_checksums.npy").exists()  # replaced after the commit
    padded = np.load(path / "versions" / "v0001" / "format6" / "cell_checksums.npy")
    np.testing.assert_array_equal(padded[:, :2], old_checksums)
    assert padded.shape == (40, 3) and not padded[:, 2].any()
    obs = atlas.obs()
    assert list(obs.columns[:4]) == ["dataset", "batch", "label", "version_added"] and len(obs) == 60
    assert (obs["version_added"] == 1).sum() == 40
    np.testing.assert_array_equal(atlas.latent(), z_file)
    pd.testing.assert_frame_equal(atlas.predictions(), predictions_file)
    assert atlas.counts().shape == (60, 200)  # the cells still pass their (old) checksums
    assert atlas.sql("select count(*) as n from cells where version_added = 2")["n"].item() == 20

    q = pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy()
    q.obs["disease"] = ["T2D" if k % 2 else "healthy" for k in range(15)]
    res = atlas.ingest(q, batch_key="tech", strategy="ewc", training={"max_epochs": 1})
    assert res.version.number == 3
    obs = Atlas.open(path).obs()
    assert obs["disease"].iloc[:60].isna().all()  # the old cells never had the column
    assert obs["disease"].iloc[60:].tolist() == q.obs["disease"].tolist()
    assert obs["user_dataset"].iloc[60:].tolist() == q.obs["dataset"].astype(str).tolist()
    assert "disease" not in Atlas.open(path, version=2).obs().columns


def test_format5_checksums_saved_with_another_numpy_header_are_not_damage(tmp_path):
    """The upgrade takes a two-column checksum file by its own recorded hash, not by how today's numpy saves it."""
    import hashlib

    path = tmp_path / "old5.atlas"
    shutil.copytree(FIXTURE.with_name("format5.atlas"), path)
    file = path / "versions" / "v0001" / "cell_checksums.npy"
    values = np.load(file)
    with open(file, "wb") as f:  # the same array, written with another .npy header (format 2.0)
        np.lib.format.write_array(f, values, version=(2, 0), allow_pickle=False)
    raw = json.loads((path / "manifest.json").read_text())
    record = raw["versions"][0]["files"]["cell_checksums.npy"]
    record.update(sha256=hashlib.sha256(file.read_bytes()).hexdigest(), size=file.stat().st_size)
    (path / "manifest.json").write_text(json.dumps(raw))
    atlas = Atlas.open(path)
    padded = np.load(path / "versions" / "v0001" / "format6" / "cell_checksums.npy")
    np.testing.assert_array_equal(padded[:, :2], values)
    assert atlas.counts().shape == (60, 200)


def test_format6_atlas_keeps_its_unaveraged_novelty_and_can_switch_to_averaging(tmp_path, pancreas):
    path = tmp_path / "old6.atlas"
    shutil.copytree(FIXTURE.with_name("format6.atlas"), path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == 6 and "novelty_smoothing" not in raw["config"]["transfer"]
    predictions_file = pd.read_parquet(path / "versions" / "v0002" / "predictions.parquet")

    atlas = Atlas.open(path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["config"]["transfer"]["novelty_smoothing"] == 1 == atlas.config.transfer.novelty_smoothing
    assert atlas.novelty_calibration().smoothing == 1  # the stored format-1 calibration file
    assert atlas.var().columns.empty and list(atlas.var().index) == atlas.genes  # format 6 kept no gene columns
    pd.testing.assert_frame_equal(atlas.predictions(), predictions_file)
    q = pancreas[pancreas.obs["tech"] == "celseq2"][:20, atlas.genes].copy()
    q.obs_names = [f"again_{c}" for c in q.obs_names]
    kept = atlas.transfer_labels(q, batch_key="tech", config={"unknown_rule": "novelty"})
    averaged = atlas.transfer_labels(q, batch_key="tech", config={"unknown_rule": "novelty", "novelty_smoothing": 5})
    assert kept.attrs["novel_share"] >= 0 and not np.allclose(kept["novelty"], averaged["novelty"])
    res = atlas.ingest(pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy(), batch_key="tech",
                       strategy="ewc", training={"max_epochs": 1})
    assert res.version.number == 3 and Atlas.open(path).novelty_calibration().smoothing == 1


def test_format7_atlas_folds_in_as_before_and_takes_the_embedding_anchor_per_ingest(tmp_path, pancreas):
    path = tmp_path / "old7.atlas"
    shutil.copytree(FIXTURE.with_name("format7.atlas"), path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == 7 and "embedding_anchor" not in raw["config"]["continual"]
    before = {p.relative_to(path): p.read_bytes() for p in (path / "versions").rglob("*") if p.is_file()}
    predictions_file = pd.read_parquet(path / "versions" / "v0002" / "predictions.parquet")

    atlas = Atlas.open(path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["config"]["continual"]["embedding_anchor"] == 0.0 == atlas.config.continual.embedding_anchor
    after = {p.relative_to(path): p.read_bytes() for p in (path / "versions").rglob("*") if p.is_file()}
    batch_parts = {k for k in before if k.name == "batch_drift.parquet"}  # format 9's column (m0008)
    assert after.keys() - before.keys() == {k.parent / "format9" / "batch_drift.parquet" for k in batch_parts}
    assert {k: v for k, v in after.items() if k in before} == {
        k: v for k, v in before.items() if k not in batch_parts}  # the version files are untouched
    pd.testing.assert_frame_equal(atlas.predictions(), predictions_file)
    v1 = Atlas.open(path, version=1).latent()
    res = atlas.ingest(pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy(), batch_key="tech",
                       strategy="ewc", training={"max_epochs": 2}, continual={"embedding_anchor": 100.0})
    assert res.version.number == 3
    run = json.loads((path / "versions" / "v0003" / "config.json").read_text())
    assert run["continual"]["embedding_anchor"] == 100.0
    np.testing.assert_array_equal(Atlas.open(path, version=1).latent(), v1)  # version 1 exactly as it was


def test_format8_atlas_gets_batch_mixing_among_version_1s_cells_and_keeps_every_other_figure(
        tmp_path, pancreas, monkeypatch):
    import hashlib

    import pyarrow.parquet as pq

    from atlasengine.store.atlas_store import AtlasStore

    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 8

    def files() -> dict:
        return {p.relative_to(path): p.read_bytes() for p in (path / "versions").rglob("*") if p.is_file()}

    before = files()
    old_rows = {k: pq.read_table(path / k).to_pandas() for k in before if k.name == "batch_drift.parquet"}
    assert len(old_rows) == 3 and all("ilisi_first_version_mean" not in df for df in old_rows.values())
    new_parts = {k.parent / "format9" / "batch_drift.parquet" for k in old_rows}

    # an upgrade that fails before its manifest is committed: the atlas stays format 8 with every
    # file it lists as it was, and the new parts it wrote beside the old are deleted; the next open upgrades it
    real_commit = AtlasStore.commit

    def dies(self, manifest):
        raise OSError("disk gone")

    monkeypatch.setattr(AtlasStore, "commit", dies)
    with pytest.raises(AtlasWriteError, match="stays in format 8: disk gone"):
        Atlas.open(path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 8
    assert files() == before
    monkeypatch.setattr(AtlasStore, "commit", real_commit)

    atlas = Atlas.open(path)
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    after = files()
    assert after.keys() == (before.keys() - old_rows.keys()) | new_parts  # the replaced parts are gone
    assert all(after[k] == before[k] for k in before.keys() - old_rows.keys())  # everything else as it was
    for key, old in old_rows.items():
        new = pq.read_table(path / key.parent / "format9" / "batch_drift.parquet").to_pandas()
        pd.testing.assert_frame_equal(new.drop(columns="ilisi_first_version_mean"), old)  # old figures as they were
    for version in raw["versions"]:  # the committed checksums hold
        for record in version["files"].values():
            assert hashlib.sha256((path / record["path"]).read_bytes()).hexdigest() == record["sha256"]
    bd = atlas.sql("select * from batch_drift order by version, batch").set_index(["version", "batch"])
    v1 = bd.loc[1]
    assert set(v1.index) == {"indrop", "celseq"}
    np.testing.assert_allclose(v1["ilisi_first_version_mean"], v1["ilisi_mean"])
    v3 = bd.loc[3]  # version 2's batch celseq2 is among version 3's cells: not one of version 1's
    assert v3.loc[["indrop", "celseq"], "ilisi_first_version_mean"].notna().all()
    assert pd.isna(v3.loc["celseq2", "ilisi_first_version_mean"])
    # the same figures as an engine of format 9 computes from the stored embeddings
    from atlasengine.api.audit import stored_drift_rows
    from atlasengine.store.version import VersionReader

    store = AtlasStore(path)
    reader = VersionReader(store, store.read_manifest())
    fresh = stored_drift_rows(reader, reader.manifest.version(3))[1].batch_drift.set_index("batch")
    np.testing.assert_allclose(v3["ilisi_first_version_mean"].astype(float),
                               fresh.loc[v3.index, "ilisi_first_version_mean"].astype(float))
    res = atlas.ingest(pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy(), batch_key="tech",
                       strategy="ewc", training={"max_epochs": 1})
    assert res.version.number == 4
    v4 = atlas.sql("select * from batch_drift where version = 4").set_index("batch")
    assert v4.loc[["indrop", "celseq"], "ilisi_first_version_mean"].notna().all()


def test_drift_rebuilt_after_the_format9_upgrade_leaves_no_file_the_manifest_does_not_list(tmp_path, pancreas):
    # the upgrade recorded version 1's batch mixing under drift/format9/; a damaged part makes the
    # next writer rebuild that version's drift at its own path: the old part must not stay behind
    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    atlas = Atlas.open(path)
    old_part = path / "versions" / "v0001" / "drift" / "format9" / "batch_drift.parquet"
    assert old_part.is_file()
    (path / "versions" / "v0001" / "drift" / "version_drift.parquet").write_bytes(b"PAR1 damaged")
    atlas.ingest(pancreas[pancreas.obs["tech"] == "smartseq2"][:15, atlas.genes].copy(), batch_key="tech",
                 strategy="surgery", training={"max_epochs": 1})
    listed = {rec["path"] for v in json.loads((path / "manifest.json").read_text())["versions"]
              for rec in v["files"].values()}
    on_disk = {str(p.relative_to(path)) for p in (path / "versions").rglob("*")
               if p.is_file() and p.name != ".atlasengine-staged"}  # the engine's marker in every version folder
    assert not old_part.exists() and on_disk == listed
    assert set(Atlas.open(path).sql("select version from batch_drift")["version"]) == {1, 2, 3, 4}


def test_an_upgrade_that_meets_a_damaged_file_says_so_and_the_version_keeps_its_old_rows(tmp_path, caplog):
    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    latent = path / "versions" / "v0003" / "latent.npy"
    data = bytearray(latent.read_bytes())
    data[-1] ^= 0xFF
    latent.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="atlasengine"):
        atlas = Atlas.open(path, version=2)  # version 3's embeddings are damaged: the others upgrade
    assert json.loads((path / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    assert any("latent.npy" in r.getMessage() and "version 3 keeps its batch_drift rows" in r.getMessage()
               for r in caplog.records)
    bd = atlas.sql("select * from batch_drift").set_index(["version", "batch"])
    assert bd.loc[2, "ilisi_first_version_mean"].notna().all()
    paths = {v["number"]: v["files"]["drift/batch_drift.parquet"]["path"]
             for v in json.loads((path / "manifest.json").read_text())["versions"]}
    assert paths == {1: "versions/v0001/drift/format9/batch_drift.parquet",
                     2: "versions/v0002/drift/format9/batch_drift.parquet",
                     3: "versions/v0003/drift/batch_drift.parquet"}  # version 3's part kept as it was
    import pyarrow.parquet as pq

    assert "ilisi_first_version_mean" not in pq.read_table(path / paths[3]).column_names


def test_an_old_atlas_being_written_by_another_process_is_refused_naming_what_holds_it(tmp_path):
    from atlasengine.errors import AtlasLockedError
    from atlasengine.store.lock import WriteLock

    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    with WriteLock(path, task="an ingest"):  # e.g. an engine of format 8 folding a query in
        with pytest.raises(AtlasLockedError, match="upgraded in place before it opens.*an ingest is running"):
            Atlas.open(path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 8
    with WriteLock(path, task=f"an upgrade to format {FORMAT_VERSION}"):
        assert Atlas.lock_holder(path)["task"] == f"an upgrade to format {FORMAT_VERSION}"
    assert Atlas.open(path).version == 3


def test_files_an_upgrade_replaced_are_deleted_by_the_next_writer_when_it_died_right_after_its_commit(
        tmp_path, monkeypatch):
    from atlasengine.store.atlas_store import SUPERSEDED, AtlasStore

    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    old_parts = sorted((path / "versions").glob("v*/drift/batch_drift.parquet"))
    assert len(old_parts) == 3

    def dies(self, manifest):
        raise KeyboardInterrupt  # the process ends between the commit and the deletion

    real = AtlasStore.remove_superseded
    monkeypatch.setattr(AtlasStore, "remove_superseded", dies)
    with pytest.raises(KeyboardInterrupt):
        Atlas.open(path)
    monkeypatch.setattr(AtlasStore, "remove_superseded", real)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == FORMAT_VERSION  # committed
    assert all(p.is_file() for p in old_parts) and (path / SUPERSEDED).is_file()  # nothing lists them now

    atlas = Atlas.open(path)  # a reader deletes nothing
    assert all(p.is_file() for p in old_parts)
    obs = atlas.obs()
    atlas.relabel(obs.index[obs["label"] == "acinar"][:2], "acinar")  # the next writer does
    assert not any(p.exists() for p in old_parts) and not (path / SUPERSEDED).exists()
    for version in json.loads((path / "manifest.json").read_text())["versions"]:  # every listed file stays
        assert all((path / record["path"]).is_file() for record in version["files"].values())
    assert atlas.sql("select count(*) from batch_drift where ilisi_first_version_mean is not null").iloc[0, 0] > 0


def _upgraded_format8(tmp_path):
    """A copy of the format-8 fixture, opened once (so upgraded): its path, store and manifest."""
    from atlasengine.store.atlas_store import AtlasStore

    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    Atlas.open(path)
    store = AtlasStore(path)
    return path, store, store.read_manifest()


def test_a_record_of_superseded_files_deletes_nothing_the_manifest_lists_or_outside_the_versions(tmp_path):
    from atlasengine.store.atlas_store import SUPERSEDED, listed_paths

    path, store, manifest = _upgraded_format8(tmp_path)
    (tmp_path / "outside.txt").write_text("a user's file")
    kept = listed_paths(manifest) | {"../outside.txt", "manifest.json"}
    store.record_superseded(kept)  # e.g. an upgrade that died before its commit: the manifest still lists them
    assert store.remove_superseded(manifest) == [] and not (path / SUPERSEDED).exists()
    assert all((path / p).is_file() for p in kept)


def test_a_record_of_superseded_files_that_cannot_be_read_now_is_kept_for_another_time(tmp_path, monkeypatch):
    from pathlib import Path

    from atlasengine.store.atlas_store import SUPERSEDED

    path, store, manifest = _upgraded_format8(tmp_path)
    stale = path / "versions" / "v0001" / "stale.bin"
    stale.write_bytes(b"no longer listed")
    store.record_superseded({"versions/v0001/stale.bin"})
    real = Path.read_text

    def unreadable(self, *a, **k):
        if self.name == SUPERSEDED:
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert store.remove_superseded(manifest) == [] and (path / SUPERSEDED).exists() and stale.exists()
    monkeypatch.undo()
    assert store.remove_superseded(manifest) == ["versions/v0001/stale.bin"] and not stale.exists()


@pytest.mark.parametrize("claimed", [True, 0, 4])
def test_a_manifest_that_claims_an_older_format_than_its_files_changes_no_committed_file(tmp_path, claimed):
    from atlasengine.errors import AtlasFormatError, AtlasIntegrityError

    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    manifest = path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(good), "format_version": claimed}))  # a hand edit
    listed = {rec["path"]: (path / rec["path"]).read_bytes()
              for v in json.loads(good)["versions"] for rec in v["files"].values()}
    with pytest.raises((AtlasFormatError, AtlasIntegrityError), match="format"):
        Atlas.open(path)
    assert all((path / p).read_bytes() == data for p, data in listed.items())  # as the manifest lists them
    manifest.write_text(good)  # the field put back: the atlas is as it was
    assert Atlas.open(path).version == 3


def test_index_files_an_upgrade_wrote_beside_the_old_ones_are_the_ones_loaded(tmp_path):
    path, store, manifest = _upgraded_format8(tmp_path)
    info = manifest.versions[-1]
    staged = store.stage()
    shutil.copytree(store.version_dir(info.number) / "index", staged / "index")
    moved = store.add_files(staged, info, "format10")  # as a later upgrade step would
    store.commit(manifest.model_copy(update={"versions": [*manifest.versions[:-1], moved]}))
    old = store.version_dir(info.number) / "index" / "neighbor_index_codes.npy"
    old.write_bytes(b"not the index the manifest lists")
    index = Atlas.open(path).neighbor_index()
    assert len(index.categories) > 0 and index.neighbor_codes(np.zeros((1, 1), dtype=np.int64)).shape == (1, 1)


def test_an_old_atlas_opened_read_only_is_refused_and_left_as_it_was(tmp_path):
    """read_only=True writes nothing, so an atlas that needs an upgrade says so instead of being rewritten."""
    from conftest import snapshot

    from atlasengine.errors import ReadOnlyError

    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    before = snapshot(path)
    with pytest.raises(ReadOnlyError, match="format 8.*read_only=True.*who can write to it opens it once without read_only"):
        Atlas.open(path, read_only=True)
    with pytest.raises(ReadOnlyError, match="read_only=True"):
        Atlas.open(path, read_only=1)  # any true value
    assert snapshot(path) == before
    from atlasengine.cli.demo import _refuse_unless_the_demos

    _refuse_unless_the_demos(path)  # the demo's own atlas of an older release is still its to replace
    assert Atlas.open(path).version == 3  # the default open upgrades it
    assert Atlas.open(path, read_only=True).version == 3


def test_an_upgrade_that_cannot_write_a_version_folder_says_so_and_leaves_the_atlas_as_it_was(tmp_path, monkeypatch):
    # found by a review: a group-shared atlas whose version folders this user may not write got a raw
    # PermissionError (exit 1 from the CLI), and each try left staged copies and an unlisted drift/format9/
    import os

    from atlasengine.errors import AtlasWriteError
    from atlasengine.store import atlas_store

    path = tmp_path / "old8.atlas"
    shutil.copytree(FIXTURE.with_name("format8.atlas"), path)
    before = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    real_replace = os.replace

    def refuse_v0002(src, dst, *args, **kwargs):
        if "v0002" in str(dst):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(atlas_store.os, "replace", refuse_v0002)
    with pytest.raises(AtlasWriteError, match="stays in format 8: .*Permission denied.*run it as a user who may"):
        Atlas.open(path)
    after = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    after.pop(".write.lock", None), before.pop(".write.lock", None)
    assert after == before  # v0001's drift/format9 part went too
    assert not [p for p in path.rglob("*") if p.is_dir() and "format9" in p.name]
    monkeypatch.setattr(atlas_store.os, "replace", real_replace)
    assert Atlas.open(path).version == 3  # the same command simply runs again
