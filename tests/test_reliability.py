"""Crashes, concurrent writers, corrupt files and divergence lose nothing and say what happened."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from atlasengine import Atlas, AtlasFormatError, AtlasIntegrityError, AtlasLockedError, TrainingError

INGEST = """
import sys, anndata as ad
from atlasengine import Atlas
a = ad.read_h5ad(sys.argv[2])
q = a[a.obs["tech"] == "smartseq2"].copy()
Atlas.open(sys.argv[1]).ingest(q, batch_key="tech", strategy="ewc", training={"max_epochs": 2})
print("committed")
"""

KILL_POINTS = ["cells_x", "after_cells", "training_epoch", "checkpoint_written", "drift_write", "before_manifest"]


def _run_ingest(path: Path, fault: str | None, wait: bool = True):
    env = dict(os.environ)
    env.pop("ATLASENGINE_FAULT", None)
    if fault:
        env["ATLASENGINE_FAULT"] = fault
    cmd = [sys.executable, "-c", INGEST, str(path), str(DATA / "pancreas_panc8_small.h5ad")]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed_counts(atlas: Atlas) -> np.ndarray:
    return atlas.counts().toarray()


def test_sigkill_at_every_stage_leaves_previous_version_intact(atlas_path, pancreas_ref, pancreas_query):
    before = Atlas.open(atlas_path)
    z1, obs1, counts1 = before.latent(), before.obs(), _committed_counts(before)
    np.testing.assert_array_equal(counts1, pancreas_ref.X.toarray())
    for point in KILL_POINTS:
        proc = _run_ingest(atlas_path, f"{point}:kill")
        assert proc.returncode == -9, (point, proc.stderr[-2000:])
        atlas = Atlas.open(atlas_path)
        assert atlas.version == 1, point
        np.testing.assert_array_equal(atlas.latent(), z1)
        assert atlas.obs().equals(obs1), point
        np.testing.assert_array_equal(_committed_counts(atlas), counts1)
        assert set(atlas.drift()["version"]) == {1}, point
        holder = Atlas.lock_holder(atlas_path)
        assert holder is not None and holder["stale"], point  # the dead writer's lock is detected
        assert Atlas.break_lock(atlas_path)
    # the same ingest now succeeds; leftovers of the killed attempts were cleaned up, never read
    proc = _run_ingest(atlas_path, None)
    assert proc.returncode == 0 and "committed" in proc.stdout, proc.stderr[-2000:]
    atlas = Atlas.open(atlas_path)
    assert atlas.version == 2 and len(atlas.obs()) == 400
    np.testing.assert_array_equal(atlas.obs().index[300:], pancreas_query.obs_names[pancreas_query.obs.tech == "smartseq2"])
    np.testing.assert_array_equal(Atlas.open(atlas_path, version=1).latent(), z1)
    assert sorted(p.name for p in (atlas_path / "versions").iterdir()) == ["v0001", "v0002"]
    assert not any((atlas_path / ".staging").glob("*"))


def test_two_writers_one_proceeds_other_gets_clear_error_readers_see_committed(atlas_path, pancreas_query):
    q = pancreas_query[pancreas_query.obs["tech"] == "celseq2"].copy()
    writer = _run_ingest(atlas_path, "training:sleep8", wait=False)
    deadline = time.time() + 120
    while Atlas.lock_holder(atlas_path) is None and time.time() < deadline:
        time.sleep(0.2)
    holder = Atlas.lock_holder(atlas_path)
    assert holder is not None and holder["pid"] == writer.pid
    with pytest.raises(AtlasLockedError, match=f"atlas is locked by pid {writer.pid} on .* since "):
        Atlas.open(atlas_path).ingest(q, batch_key="tech", strategy="surgery")
    reader = Atlas.open(atlas_path)  # a reader during the ingest sees the last committed version
    assert reader.version == 1 and len(reader.obs()) == 300 and reader.latent().shape[0] == 300
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    assert Atlas.open(atlas_path).version == 2
    assert reader.version == 1 and len(reader.obs()) == 300  # an open reader keeps its snapshot


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("target", ["model.safetensors", "latent.npy", "index/neighbor_index.faiss"])
def test_corrupt_version_file_is_named_and_other_versions_stay_usable(two_version_atlas, tmp_path, damage, target):
    atlas_path = tmp_path / "a.atlas"
    shutil.copytree(two_version_atlas, atlas_path)
    z1 = Atlas.open(atlas_path, version=1).latent()
    path = atlas_path / "versions" / "v0002" / target
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    with pytest.raises(AtlasIntegrityError, match=f"versions/v0002/{target}.* of version 2"):
        Atlas.open(atlas_path)
    np.testing.assert_array_equal(Atlas.open(atlas_path, version=1).latent(), z1)


def test_newer_format_and_non_atlas_paths_are_refused(atlas_path, tmp_path):
    manifest = atlas_path / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["format_version"] = 99
    manifest.write_text(json.dumps(raw))
    with pytest.raises(AtlasFormatError, match="format 99, newer than this atlasengine supports"):
        Atlas.open(atlas_path)
    manifest.write_text("{not json")
    with pytest.raises(AtlasFormatError, match="not a readable atlas manifest"):
        Atlas.open(atlas_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(AtlasFormatError, match="not an atlas"):
        Atlas.open(tmp_path)


def test_diverging_training_stops_reports_and_commits_nothing(atlas_path, pancreas_query):
    atlas = Atlas.open(atlas_path)
    with pytest.raises(TrainingError, match="diverged|not finite|nan"):
        atlas.ingest(pancreas_query, batch_key="tech", strategy="finetune", training={"lr": 1e12, "max_epochs": 5})
    reopened = Atlas.open(atlas_path)
    assert reopened.version == 1 and len(reopened.obs()) == 300
    assert Atlas.lock_holder(atlas_path) is None
