"""Crashes, concurrent writers, corrupt files and divergence lose nothing and say what happened."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import ingest_in_subprocess, soma_cells

from atlasengine import Atlas, AtlasFormatError, AtlasIntegrityError, TrainingError

KILL_POINTS = ["cells_x", "cells_metadata", "training_epoch", "checkpoint_written", "drift_write", "before_manifest"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_sigkilled_ingest_just_runs_again(reference_atlas, tmp_path, pancreas_ref, pancreas_query, point):
    atlas_path = tmp_path / "pancreas.atlas"
    shutil.copytree(reference_atlas, atlas_path)
    before = Atlas.open(atlas_path)
    z1, obs1 = before.latent(), before.obs()
    np.testing.assert_array_equal(before.counts().toarray(), pancreas_ref.X.toarray())

    killed = ingest_in_subprocess(atlas_path, f"{point}:kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    atlas = Atlas.open(atlas_path)  # the previous version, exactly as it was
    assert atlas.version == 1
    np.testing.assert_array_equal(atlas.latent(), z1)
    assert atlas.obs().equals(obs1)
    np.testing.assert_array_equal(atlas.counts().toarray(), pancreas_ref.X.toarray())
    assert set(atlas.drift()["version"]) == {1}
    assert Atlas.lock_holder(atlas_path) is None  # the dead writer holds nothing

    # the same call again (here, to keep the suite short: the lock is the kernel's either way), no unlock
    smartseq2 = pancreas_query[pancreas_query.obs["tech"] == "smartseq2"].copy()
    rerun = Atlas.open(atlas_path).ingest(smartseq2, batch_key="tech", strategy="ewc", training={"max_epochs": 2})
    assert rerun.version.number == 2
    atlas = Atlas.open(atlas_path)
    assert [v.number for v in atlas.versions] == [1, 2] and len(atlas.obs()) == 400
    np.testing.assert_array_equal(atlas.obs().index[300:], smartseq2.obs_names)
    assert (atlas.obs()["tech"].iloc[300:] == "smartseq2").all()  # its own obs columns, not a killed run's
    assert set(atlas.drift()["version"]) == {1, 2}
    np.testing.assert_array_equal(Atlas.open(atlas_path, version=1).latent(), z1)
    assert sorted(p.name for p in (atlas_path / "versions").iterdir()) == ["v0001", "v0002"]
    assert not any((atlas_path / ".staging").glob("*"))
    # read as SOMA readers do, past the engine: the killed write's cells went, each cell is there once
    names, with_counts = soma_cells(atlas_path)
    assert names == list(atlas.obs().index) and len(with_counts) == 400
    tables = sorted(p.name for p in (atlas_path / "cells" / "obs_columns").iterdir() if p.name.startswith("joinids_"))
    assert len(tables) == 2, tables  # the reference's own columns and smartseq2's


CREATE = """
import sys, anndata as ad
from atlasengine import Atlas
a = ad.read_h5ad(sys.argv[2])
ref = a[a.obs["tech"].isin(["celseq", "fluidigmc1", "indrop"])].copy()
Atlas.create(sys.argv[1], ref, batch_key="tech", label_key="celltype",
             config={"model": {"n_hidden": 16, "n_latent": 4}, "reference_training": {"max_epochs": 2}})
"""


def test_a_sigkilled_create_just_runs_again_and_its_half_built_copy_goes(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import DATA

    from atlasengine.store.lock import WriteLock

    target = tmp_path / "new.atlas"
    cmd = [sys.executable, "-c", CREATE, str(target), str(DATA / "pancreas_panc8_small.h5ad")]
    killed = subprocess.run(cmd, env={**os.environ, "ATLASENGINE_FAULT": "training_epoch:kill"}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = list(tmp_path.glob(".new.atlas.creating-*"))
    assert len(left) == 1 and (left[0] / "cells").is_dir() and not target.exists()
    busy = tmp_path / ".new.atlas.creating-busy0000"  # another create still at work: never touched
    busy.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ATLASENGINE_FAULT"}
    with WriteLock(busy):
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
    assert Atlas.open(target).version == 1
    assert [p.name for p in tmp_path.glob(".new.atlas.creating-*")] == [busy.name]


def test_a_create_that_has_made_its_lock_file_but_not_yet_locked_it_is_not_taken_for_a_dead_one(tmp_path):
    import os
    import time

    from atlasengine.api.foldin import _remove_abandoned_builds
    from atlasengine.store.lock import LOCK_NAME

    target = tmp_path / "new.atlas"
    starting, dead, old_empty = (tmp_path / f".new.atlas.creating-{n}" for n in ("start000", "dead0000", "empty000"))
    for folder in (starting, dead, old_empty):
        folder.mkdir()
        (folder / "cells").mkdir()
    (starting / LOCK_NAME).touch()  # opened by a create an instant before its flock: nobody holds it yet
    (dead / LOCK_NAME).write_text('{"pid": 1, "host": "h", "since": "t", "task": "a create"}')  # killed holding it
    (old_empty / LOCK_NAME).touch()  # a create killed between opening and locking, long ago
    an_hour_ago = time.time() - 3600
    os.utime(old_empty / LOCK_NAME, (an_hour_ago, an_hour_ago))

    _remove_abandoned_builds(target)

    assert starting.is_dir() and (starting / "cells").is_dir()
    assert not dead.exists() and not old_empty.exists()


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
