"""What a writer cleans up (only what the engine staged) and rebuilds (drift rows that went missing)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import snapshot

from atlasengine import Atlas, AtlasConflictError, AtlasFormatError, InputError
from atlasengine.store.atlas_store import AtlasStore


def _smartseq2(pancreas_query):
    return pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()


def _leftover(atlas_path, where: str):
    """A folder staged by a writer that was killed: in .staging, or already renamed to versions/v0002."""
    staged = AtlasStore(atlas_path).stage()
    (staged / "model.safetensors").write_bytes(b"half a checkpoint")
    if where == "versions":
        staged.rename(atlas_path / "versions" / "v0002")
    return staged


def test_only_folders_the_engine_staged_are_removed_and_stray_files_are_ignored(atlas_path, pancreas_query):
    user_folder = atlas_path / "versions" / "v0002_backup"
    shutil.copytree(atlas_path / "versions" / "v0001", user_folder)
    (atlas_path / "versions" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (atlas_path / ".staging").mkdir(exist_ok=True)
    (atlas_path / ".staging" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (atlas_path / ".staging" / "notes").mkdir()
    staged = _leftover(atlas_path, ".staging")
    _leftover(atlas_path, "versions")

    res = Atlas.open(atlas_path).ingest(_smartseq2(pancreas_query), batch_key="tech", strategy="surgery",
                                        training={"max_epochs": 1})
    assert res.version.number == 2 and not staged.exists()
    assert sorted(p.name for p in (atlas_path / "versions").iterdir()) == [".DS_Store", "v0001", "v0002",
                                                                           "v0002_backup"]
    assert sorted(p.name for p in (atlas_path / ".staging").iterdir()) == [".DS_Store", "notes"]
    assert (user_folder / "model.safetensors").read_bytes() == (
        atlas_path / "versions" / "v0001" / "model.safetensors").read_bytes()
    assert Atlas.open(atlas_path).version == 2  # every file of the new version checked


def test_a_removal_of_a_leftover_cut_short_is_finished_by_the_next_writer(atlas_path, pancreas_query, monkeypatch):
    from pathlib import Path

    _leftover(atlas_path, "versions")
    leftover = atlas_path / "versions" / "v0002"
    (leftover / "index").mkdir()
    (leftover / "index" / "neighbor_index.faiss").write_bytes(b"half an index")
    real_unlink = Path.unlink

    def killed_at_the_marker(self, *args, **kwargs):  # the writer dies as it deletes the marker
        if self.name == ".atlasengine-staged":
            raise KeyboardInterrupt
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        Atlas.open(atlas_path).ingest(_smartseq2(pancreas_query), batch_key="tech", strategy="surgery",
                                      training={"max_epochs": 1})
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert [p.name for p in leftover.iterdir()] == [".atlasengine-staged"]  # the marker goes last: still the engine's
    (atlas_path / ".staging").mkdir(exist_ok=True)
    empty_staged = atlas_path / ".staging" / ("0" * 32)  # made by a writer that died before marking it
    empty_staged.mkdir()
    half = atlas_path / ".manifest.json.tmp-4242"  # a commit killed between writing the manifest and renaming it
    half.write_text('{"format_version": 9, "versi')
    half_record = atlas_path / "..superseded.json.tmp-4243"  # the same of an upgrade's record (atomic_write_text)
    half_record.write_text('["versions/v0001/dri')

    res = Atlas.open(atlas_path).ingest(_smartseq2(pancreas_query), batch_key="tech", strategy="surgery",
                                        training={"max_epochs": 1})
    assert res.version.number == 2 and not empty_staged.exists() and not half.exists() and not half_record.exists()


def test_an_empty_version_folder_left_by_a_cut_short_removal_does_not_block_the_next_version(
        atlas_path, pancreas_query):
    (atlas_path / "versions" / "v0002").mkdir()  # its marker and files gone, the folder not yet
    res = Atlas.open(atlas_path).ingest(_smartseq2(pancreas_query), batch_key="tech", strategy="surgery",
                                        training={"max_epochs": 1})
    assert res.version.number == 2 and Atlas.open(atlas_path).version == 2


def test_a_refused_input_leaves_even_the_leftovers_as_they_were(atlas_path, pancreas_query):
    staged = _leftover(atlas_path, ".staging")
    _leftover(atlas_path, "versions")
    before = snapshot(atlas_path)
    atlas = Atlas.open(atlas_path)
    with pytest.raises(InputError, match="no_such_column"):
        atlas.ingest(_smartseq2(pancreas_query), batch_key="no_such_column")
    with pytest.raises(InputError, match="not in the atlas"):
        atlas.relabel(["no-such-cell"], "x")
    assert snapshot(atlas_path) == before
    res = atlas.ingest(_smartseq2(pancreas_query), batch_key="tech", strategy="surgery", training={"max_epochs": 1})
    assert res.version.number == 2 and not staged.exists()  # an accepted one tidies up first


def test_nothing_behind_a_linked_versions_folder_is_removed(atlas_path, tmp_path, pancreas_query):
    elsewhere = tmp_path / "bigdisk" / "versions"
    shutil.move(atlas_path / "versions", elsewhere)
    (atlas_path / "versions").symlink_to(elsewhere)
    (elsewhere / "other_project").mkdir()
    (elsewhere / "other_project" / "data.txt").write_text("not the engine's")
    Atlas.open(atlas_path).ingest(_smartseq2(pancreas_query), batch_key="tech", strategy="surgery",
                                  training={"max_epochs": 1})
    assert (elsewhere / "other_project" / "data.txt").read_text() == "not the engine's"
    assert (elsewhere / "v0002").is_dir() and Atlas.open(atlas_path).version == 2


@pytest.mark.parametrize("obstacle", ["staging_file", "unknown_version_folder"])
def test_what_would_block_a_commit_is_refused_before_anything_is_written(atlas_path, pancreas_query, obstacle):
    if obstacle == "staging_file":
        shutil.rmtree(atlas_path / ".staging", ignore_errors=True)
        (atlas_path / ".staging").write_text("a file, not the engine's folder")
        error, message = AtlasFormatError, r"\.staging is not a folder"
    else:
        (atlas_path / "versions" / "v0002").mkdir()
        (atlas_path / "versions" / "v0002" / "mine.txt").write_text("put here by hand")
        error, message = AtlasConflictError, "v0002 already exists but is not a committed version"
    before = snapshot(atlas_path)
    with pytest.raises(error, match=message):
        Atlas.open(atlas_path).ingest(_smartseq2(pancreas_query), batch_key="tech", strategy="surgery")
    assert snapshot(atlas_path) == before


def test_deleted_or_damaged_drift_rows_are_recomputed_and_rebuilt_never_emptied(two_version_atlas, tmp_path,
                                                                              pancreas_query, caplog):
    atlas_path = tmp_path / "a.atlas"
    shutil.copytree(two_version_atlas, atlas_path)
    before = {by: Atlas.open(atlas_path).drift(by=by) for by in (None, "cell_type", "cell")}
    drift_files = [f for f in atlas_path.rglob("*") if f.is_file() and "drift" in f.name + f.parent.name]
    assert drift_files
    for f in drift_files[::2]:
        f.unlink()  # deleted
    for f in drift_files[1::2]:
        f.write_bytes(b"PAR1 damaged")  # or damaged

    with caplog.at_level(logging.WARNING, logger="atlasengine"):
        now = Atlas.open(atlas_path).drift()
    assert "recomputed from its stored embeddings" in caplog.text
    pd.testing.assert_frame_equal(now[["version", "scope"]], before[None][["version", "scope"]])
    numbers = now.columns[2:]
    np.testing.assert_allclose(now[numbers].to_numpy(float), before[None][numbers].to_numpy(float), rtol=1e-4)

    again = _smartseq2(pancreas_query)
    again.obs["tech"], again.obs_names = "smartseq2_again", "again_" + again.obs_names
    Atlas.open(atlas_path).ingest(again, batch_key="tech", strategy="surgery", training={"max_epochs": 1})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="atlasengine"):
        atlas = Atlas.open(atlas_path)
        after = {by: atlas.drift(by=by) for by in (None, "cell_type", "cell")}
    assert caplog.text == ""  # the writer rebuilt the parts and recorded their checksums
    assert sorted(set(after[None]["version"])) == [1, 2, 3]
    for by, frame in before.items():
        old = after[by][after[by]["version"] <= 2].reset_index(drop=True)
        assert len(old) == len(frame) and old["version"].tolist() == frame["version"].tolist()


def test_drift_rows_rebuilt_after_a_relabel_keep_the_labels_of_their_own_version(two_version_atlas, tmp_path):
    atlas_path = tmp_path / "a.atlas"
    shutil.copytree(two_version_atlas, atlas_path)
    atlas = Atlas.open(atlas_path)
    before = atlas.drift(by="cell_type")
    alpha = atlas.obs().index[atlas.obs()["label"] == "alpha"][:20]
    atlas.relabel(list(alpha), "alpha_renamed")  # version 3 renames reference cells of version 1
    for f in (atlas_path / "versions" / "v0002" / "drift").iterdir():
        f.unlink()  # version 2's rows are lost and recomputed from its stored embeddings

    now = Atlas.open(atlas_path).drift(by="cell_type")
    old = now[now["version"] <= 2].reset_index(drop=True)
    assert "alpha_renamed" not in set(old.astype(str).to_numpy().ravel())
    pd.testing.assert_frame_equal(old[before.columns[:3]], before[before.columns[:3]])
